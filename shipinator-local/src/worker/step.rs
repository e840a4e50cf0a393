//! Running one step's command: a process group, streamed logs, timeout and cancellation.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use shipinator_core::executor::ExecutionSpec;
use shipinator_core::logs::LogStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::error::Error;
use rustix::process::Signal;

use crate::process::{ProcessIdentity, signal_group, terminate_group};
use crate::worker::log::LogSink;

/// The longest line kept whole; longer lines are split.
const MAX_LINE: usize = 64 * 1024;

/// Asks a running execution to stop. Cloning shares the request.
#[derive(Debug, Clone)]
pub struct CancelHandle(watch::Sender<bool>);

/// Tells a running execution that it should stop.
#[derive(Debug, Clone)]
pub struct CancelSignal(watch::Receiver<bool>);

/// A connected cancel handle and signal.
pub fn cancel_pair() -> (CancelHandle, CancelSignal) {
    let (tx, rx) = watch::channel(false);
    (CancelHandle(tx), CancelSignal(rx))
}

impl CancelHandle {
    /// Requests cancellation (idempotent).
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl CancelSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // With the sender gone, `cancelled` waits forever.
        drop(tx);
        Self(rx)
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancellation is requested; never, if the handle is dropped first.
    pub async fn cancelled(&mut self) {
        if self.0.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a step's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExit {
    /// It exited by itself; `code` is the exit code, or 128 + the signal that killed it.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// It ran past its timeout and its process group was stopped.
    TimedOut {
        /// The timeout.
        after: Duration,
        /// 128 + the signal that ended it (or its own exit code).
        code: i32,
    },
    /// It was cancelled and its process group was stopped.
    Canceled,
}

impl StepExit {
    /// The exit code to report (`-1` for a cancelled step).
    pub fn code(&self) -> i32 {
        match self {
            StepExit::Exited { code } | StepExit::TimedOut { code, .. } => *code,
            StepExit::Canceled => -1,
        }
    }
}

/// The environment every user command and engine helper starts from: the engine's `PATH` and
/// `HOME`, and a fixed locale. Nothing else of the engine's own environment leaks through,
/// except the variables named with [`BaseEnv::pass`], and those reach user commands only.
#[derive(Debug, Clone)]
pub struct BaseEnv {
    path: OsString,
    home: Option<OsString>,
    passed: Vec<(String, OsString)>,
}

impl BaseEnv {
    /// Captured from the current process's `PATH` and `HOME`.
    pub fn from_process() -> Self {
        Self {
            path: std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            home: std::env::var_os("HOME"),
            passed: Vec::new(),
        }
    }

    /// Also hands user commands the current process's value of each of `names` that is set
    /// (for example `CARGO_TARGET_DIR`, so a build inside a step shares the caller's cache).
    /// Engine helpers (git) never see them; a step's own `env` still wins.
    pub fn pass<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for name in names {
            let name = name.into();
            if let Some(value) = std::env::var_os(&name) {
                self.passed.retain(|(n, _)| *n != name);
                self.passed.push((name, value));
            }
        }
        self
    }

    /// The variables, as `(name, value)` pairs.
    pub fn vars(&self) -> Vec<(&'static str, OsString)> {
        let mut out = vec![("PATH", self.path.clone()), ("LANG", "C.UTF-8".into())];
        if let Some(home) = &self.home {
            out.push(("HOME", home.clone()));
        }
        out
    }

    /// The variables passed through to user commands with [`BaseEnv::pass`].
    pub fn passed(&self) -> &[(String, OsString)] {
        &self.passed
    }
}

impl Default for BaseEnv {
    fn default() -> Self {
        Self::from_process()
    }
}

/// Kills a spawned group if the future running it is dropped before it was reaped.
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = signal_group(self.pgid, Signal::KILL);
        }
    }
}

/// Runs steps' commands. One process per step: the command itself, leading its own process
/// group.
#[derive(Debug, Clone)]
pub struct StepRunner {
    grace: Duration,
    base_env: BaseEnv,
}

impl StepRunner {
    /// A runner that gives a group `grace` between TERM and KILL.
    pub fn new(grace: Duration, base_env: BaseEnv) -> Self {
        Self { grace, base_env }
    }

    /// Runs `spec.command` in `cwd` with the base environment plus `spec.env` (plus
    /// `SHIPINATOR_WORKSPACE` when the spec does not set it), streaming its output into `log`.
    ///
    /// `on_spawn` is called with the command's identity right after it started (the local
    /// executor writes its pidfile there). When the command exits, whatever it left running in
    /// its process group is stopped too (TERM, grace, KILL).
    ///
    /// # Errors
    /// The command is empty or cannot be started.
    pub async fn run(
        &self,
        spec: &ExecutionSpec,
        workspace: &Path,
        cwd: &Path,
        log: &mut LogSink,
        cancel: &mut CancelSignal,
        on_spawn: &mut (dyn FnMut(ProcessIdentity) + Send),
    ) -> Result<StepExit, Error> {
        let Some((program, args)) = spec.command.split_first() else {
            return Err(Error::Spec {
                reason: "the step has an empty command".to_owned(),
            });
        };
        // With a `PATH` in the child's environment and a bare program name, the standard
        // library falls back to fork + exec (it cannot tell which `PATH` `posix_spawnp` would
        // search); with the program resolved here it spawns with `posix_spawn`, working
        // directory and process group included, which does not copy the engine's page tables.
        let resolved = resolve_program(program, self.child_path(&spec.env));
        let mut cmd = tokio::process::Command::new(resolved.as_deref().unwrap_or(program.as_ref()));
        cmd.arg0(program)
            .args(args)
            .env_clear()
            .envs(self.base_env.vars())
            .envs(self.base_env.passed().iter().map(|(k, v)| (k, v)))
            .envs(&spec.env)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if !spec.env.contains_key("SHIPINATOR_WORKSPACE") {
            cmd.env("SHIPINATOR_WORKSPACE", workspace);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting `{program}` in {}", cwd.display()), e))?;
        let pid = child.id().ok_or_else(|| Error::Spec {
            reason: "the step's process exited before it could be observed".to_owned(),
        })?;
        let mut guard = GroupGuard {
            pgid: pid,
            armed: true,
        };
        if let Ok(identity) = ProcessIdentity::of(pid) {
            on_spawn(identity);
        }

        let (tx, rx) = mpsc::channel(1024);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let grace = self.grace;
        // The readers run in this task (no extra task per step). Once the group is gone they
        // get a bounded time to drain: a process that left the group may hold the pipes open.
        let readers = async move {
            let read_both = async {
                tokio::join!(
                    read_lines(stdout, LogStream::Stdout, tx.clone()),
                    read_lines(stderr, LogStream::Stderr, tx),
                )
            };
            let give_up = async {
                let _ = done_rx.await;
                tokio::time::sleep(grace.max(Duration::from_secs(1))).await;
            };
            tokio::select! {
                _ = read_both => {}
                () = give_up => {}
            }
        };
        let timeout = spec.timeout;
        let supervise = async {
            let exit = supervise(&mut child, pid, timeout, grace, cancel).await;
            // Whatever the command left behind in its group goes with it.
            let cleanup = terminate_group(pid, grace).await;
            let _ = done_tx.send(());
            (exit, cleanup)
        };
        let ((), (), (exit, cleanup)) = tokio::join!(log.pump(rx), readers, supervise);
        guard.armed = false;
        if let Err(e) = cleanup {
            tracing::warn!(pid, error = %e, "stopping the rest of a step's process group failed");
        }
        exit
    }
}

impl StepRunner {
    /// The `PATH` the command will see: the step's own, else a passed one, else the base one
    /// (the order in which [`StepRunner::run`] applies them).
    fn child_path<'a>(&'a self, env: &'a BTreeMap<String, String>) -> &'a OsStr {
        if let Some(path) = env.get("PATH") {
            return OsStr::new(path);
        }
        self.base_env
            .passed()
            .iter()
            .rev()
            .find(|(name, _)| name == "PATH")
            .map_or(self.base_env.path.as_os_str(), |(_, value)| {
                value.as_os_str()
            })
    }
}

/// Where `execvp` would find `program` on `path`: the first executable regular file named
/// `program` in an absolute directory of `path`. `None` when `program` already names a path,
/// or when the search would reach a relative entry (resolved against the child's working
/// directory) or find nothing: the caller then leaves the search to the spawn itself.
fn resolve_program(program: &str, path: &OsStr) -> Option<PathBuf> {
    if program.is_empty() || program.contains('/') {
        return None;
    }
    for dir in std::env::split_paths(path) {
        if !dir.is_absolute() {
            return None;
        }
        let candidate = dir.join(program);
        let is_file = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if is_file && rustix::fs::access(&candidate, rustix::fs::Access::EXEC_OK).is_ok() {
            return Some(candidate);
        }
    }
    None
}

async fn supervise(
    child: &mut tokio::process::Child,
    pgid: u32,
    timeout: Option<Duration>,
    grace: Duration,
    cancel: &mut CancelSignal,
) -> Result<StepExit, Error> {
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| Error::io("waiting for the step", e))?;
            Ok(StepExit::Exited { code: exit_code(status) })
        }
        () = deadline => {
            terminate_group(pgid, grace).await.map_err(|e| Error::io("stopping a timed-out step", e))?;
            let status = child.wait().await.map_err(|e| Error::io("waiting for the step", e))?;
            Ok(StepExit::TimedOut { after: timeout.unwrap_or_default(), code: exit_code(status) })
        }
        () = cancel.cancelled() => {
            terminate_group(pgid, grace).await.map_err(|e| Error::io("stopping a cancelled step", e))?;
            let _ = child.wait().await;
            Ok(StepExit::Canceled)
        }
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn read_lines(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: LogStream,
    tx: mpsc::Sender<(LogStream, String)>,
) {
    let Some(pipe) = pipe else {
        return;
    };
    let mut reader = BufReader::with_capacity(16 * 1024, pipe);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // Read one line, but never more than MAX_LINE bytes of it at once.
        let mut limited = (&mut reader).take(MAX_LINE as u64);
        match limited.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        if tx.send((stream, text)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(path: &Path, mode: u32) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn resolves_like_execvp_or_not_at_all() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        file(&a.join("tool"), 0o644);
        file(&b.join("tool"), 0o755);
        std::fs::create_dir_all(a.join("dir")).unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        // Not executable in `a`: the one in `b`.
        assert_eq!(resolve_program("tool", &path), Some(b.join("tool")));
        // A directory is not a program.
        assert_eq!(resolve_program("dir", &path), None);
        assert_eq!(resolve_program("missing", &path), None);
        // Paths are the spawn's business.
        assert_eq!(resolve_program("./tool", &path), None);
        assert_eq!(resolve_program("", &path), None);
        // A relative entry before a match depends on the child's directory: left alone.
        let relative = std::env::join_paths([Path::new("rel"), &b]).unwrap();
        assert_eq!(resolve_program("tool", &relative), None);
        assert_eq!(resolve_program("tool", OsStr::new("")), None);
    }

    #[test]
    fn the_steps_path_wins_over_passed_and_base_ones() {
        let base = BaseEnv {
            path: "/base".into(),
            home: None,
            passed: Vec::new(),
        };
        let mut env = BTreeMap::new();
        let runner = StepRunner::new(Duration::from_secs(1), base.clone());
        assert_eq!(runner.child_path(&env), OsStr::new("/base"));
        let passed = BaseEnv {
            passed: vec![("PATH".to_owned(), "/passed".into())],
            ..base
        };
        let runner = StepRunner::new(Duration::from_secs(1), passed);
        assert_eq!(runner.child_path(&env), OsStr::new("/passed"));
        env.insert("PATH".to_owned(), "/own".to_owned());
        assert_eq!(runner.child_path(&env), OsStr::new("/own"));
    }
}
