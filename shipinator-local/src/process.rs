//! Process groups, signals and pidfiles.
//!
//! A pid alone names a process only while it lives: once it exits the kernel may hand the
//! number to someone else. A [`ProcessIdentity`] pairs the pid with the process start time
//! (`/proc/<pid>/stat` field 22), so a restarted engine never signals a recycled pid.

use std::io;
use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, Signal};

/// A process, named so that a recycled pid does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// Process id; also the id of the process group it leads.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) state: char,
    pub(crate) pgid: i32,
    pub(crate) start_time: u64,
}

/// Reads `/proc/<pid>/stat`; `Ok(None)` when no such process exists.
pub(crate) fn proc_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    parse_stat(&text).map(Some).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected format of /proc/{pid}/stat"),
        )
    })
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may contain spaces and ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field n is `fields[n - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

impl ProcessIdentity {
    /// The identity of the live process `pid`.
    ///
    /// # Errors
    /// No such process, or `/proc` cannot be read.
    pub fn of(pid: u32) -> io::Result<Self> {
        let stat = proc_stat(pid)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}")))?;
        Ok(Self {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Whether this exact process (same pid, same start time) still exists and has not exited.
    pub fn is_alive(&self) -> bool {
        matches!(proc_stat(self.pid), Ok(Some(stat))
            if stat.start_time == self.start_time && stat.state != 'Z' && stat.state != 'X')
    }

    /// Whether the process exists with this start time and leads its own process group,
    /// which is how every step the local executor starts is set up.
    pub fn is_live_group_leader(&self) -> bool {
        matches!(proc_stat(self.pid), Ok(Some(stat))
            if stat.start_time == self.start_time
                && i64::from(stat.pgid) == i64::from(self.pid)
                && stat.state != 'X')
    }

    /// The pidfile text: `<pid> <start-time>\n`.
    pub fn to_pidfile(&self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    /// Parses pidfile text.
    pub fn from_pidfile(text: &str) -> Option<Self> {
        let mut it = text.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    /// Writes a pidfile atomically (write then rename).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_pidfile(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, self.to_pidfile().as_bytes())
    }

    /// Reads a pidfile; `Ok(None)` when it does not exist or is unreadable garbage.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn read_pidfile(path: &Path) -> io::Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self::from_pidfile(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Sends `signal` to the process group led by `pgid`; a group that no longer exists is fine.
pub(crate) fn signal_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return Ok(());
    };
    match rustix::process::kill_process_group(pid, signal) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any process of the group led by `pgid` exists (zombies included).
pub(crate) fn group_exists(pgid: u32) -> bool {
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    // EPERM means it exists but belongs to someone else.
    !matches!(
        rustix::process::test_kill_process_group(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// Whether the group led by `pgid` still has a process that is not a zombie. Zombies are
/// dead: they only wait for their parent (or init) to reap them.
pub(crate) fn group_has_live_members(pgid: u32) -> bool {
    if !group_exists(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    let Ok(pgid) = i32::try_from(pgid) else {
        return false;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(Some(stat)) = proc_stat(pid)
            && stat.pgid == pgid
            && stat.state != 'Z'
            && stat.state != 'X'
        {
            return true;
        }
    }
    false
}

/// TERM to the whole group, up to `grace` for it to go, then KILL to whatever is left.
/// Returns when no live member remains (or after a bounded wait following KILL).
pub(crate) async fn terminate_group(pgid: u32, grace: Duration) -> io::Result<()> {
    if !group_has_live_members(pgid) {
        return Ok(());
    }
    signal_group(pgid, Signal::TERM)?;
    if wait_group_gone(pgid, grace).await {
        return Ok(());
    }
    signal_group(pgid, Signal::KILL)?;
    // KILL cannot be caught; the kernel only needs a moment to tear the processes down.
    wait_group_gone(pgid, Duration::from_secs(5)).await;
    Ok(())
}

async fn wait_group_gone(pgid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if !group_has_live_members(pgid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let text = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgid, 1234);
        assert_eq!(stat.start_time, 98765);
    }

    #[test]
    fn own_identity_round_trips_through_a_pidfile() {
        let me = ProcessIdentity::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert_eq!(ProcessIdentity::from_pidfile(&me.to_pidfile()), Some(me));
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
    }
}
