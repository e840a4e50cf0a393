//! Requests between processes sharing a data directory, about runs one of them drives.
//!
//! The process driving a run (`shipinator run`) marks it with a driver file holding its own
//! [`ProcessIdentity`]; another process (`shipinator runs cancel`) leaves a cancel request
//! next to it, which the driving process picks up on its next look. Files rather than the
//! store: they need no schema, work the same whatever store the data directory uses, and a
//! request survives the driving process, so a later `--resume` honours it too.
//!
//! ```text
//! <data>/runs/<run-id>.driver   "<pid> <start-time>" of the process driving the run
//! <data>/runs/<run-id>.cancel   present once someone asked to cancel the run
//! ```

use std::io;
use std::path::{Path, PathBuf};

use shipinator_core::domain::RunId;

use crate::data_dir::DataDir;
use crate::process::{ProcessIdentity, write_atomic};

/// Cancel requests and driver marks of the runs of one data directory.
#[derive(Debug, Clone)]
pub struct RunControl {
    dir: PathBuf,
}

impl RunControl {
    /// The control files of `data` (`<data>/runs/`).
    pub fn new(data: &DataDir) -> Self {
        Self { dir: data.runs() }
    }

    /// The driver file of `run`.
    pub fn driver_path(&self, run: RunId) -> PathBuf {
        self.dir.join(format!("{run}.driver"))
    }

    /// The cancel request of `run`.
    pub fn cancel_path(&self, run: RunId) -> PathBuf {
        self.dir.join(format!("{run}.cancel"))
    }

    /// Marks this process as the one driving `run` until the returned guard is dropped.
    ///
    /// # Errors
    /// The file cannot be written, or this process's identity cannot be read from `/proc`.
    pub fn drive(&self, run: RunId) -> io::Result<DriverMark> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.driver_path(run);
        ProcessIdentity::of(std::process::id())?.write_pidfile(&path)?;
        Ok(DriverMark { path })
    }

    /// The live process driving `run`, if any: one whose pid *and* start time match its
    /// driver file (a stale file of a killed process, or a recycled pid, gives `None`).
    ///
    /// # Errors
    /// The driver file exists but cannot be read.
    pub fn driver(&self, run: RunId) -> io::Result<Option<ProcessIdentity>> {
        Ok(
            ProcessIdentity::read_pidfile(&self.driver_path(run))?
                .filter(ProcessIdentity::is_alive),
        )
    }

    /// Asks whoever drives `run` to cancel it. Idempotent.
    ///
    /// # Errors
    /// The request cannot be written.
    pub fn request_cancel(&self, run: RunId) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        write_atomic(&self.cancel_path(run), b"cancel\n")
    }

    /// Whether someone asked to cancel `run`.
    pub fn cancel_requested(&self, run: RunId) -> bool {
        self.cancel_path(run).exists()
    }

    /// Forgets the control files of a finished run.
    pub fn clear(&self, run: RunId) {
        for path in [self.cancel_path(run), self.driver_path(run)] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes the driver file when dropped (a killed process leaves it behind; its identity then
/// no longer matches a live process).
#[derive(Debug)]
pub struct DriverMark {
    path: PathBuf,
}

impl DriverMark {
    /// The driver file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DriverMark {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_mark_names_this_process_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let control = RunControl::new(&DataDir::new(tmp.path()));
        let run = RunId::new_v7();
        assert_eq!(control.driver(run).unwrap(), None);
        let mark = control.drive(run).unwrap();
        let me = control.driver(run).unwrap().unwrap();
        assert_eq!(me.pid, std::process::id());
        drop(mark);
        assert_eq!(control.driver(run).unwrap(), None);
    }

    #[test]
    fn a_stale_driver_file_names_no_one() {
        let tmp = tempfile::tempdir().unwrap();
        let control = RunControl::new(&DataDir::new(tmp.path()));
        let run = RunId::new_v7();
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        let recycled = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        std::fs::create_dir_all(tmp.path().join("runs")).unwrap();
        recycled.write_pidfile(&control.driver_path(run)).unwrap();
        assert_eq!(control.driver(run).unwrap(), None);
    }

    #[test]
    fn cancel_requests_are_per_run_and_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let control = RunControl::new(&DataDir::new(tmp.path()));
        let (a, b) = (RunId::new_v7(), RunId::new_v7());
        control.request_cancel(a).unwrap();
        control.request_cancel(a).unwrap();
        assert!(control.cancel_requested(a));
        assert!(!control.cancel_requested(b));
        control.clear(a);
        assert!(!control.cancel_requested(a));
    }
}
