//! `shipinator run` under signals, timeouts, cancel requests and crashes; a pipeline in a
//! subdirectory; the terminal view. The real binary on real git repositories in temp
//! directories. Every wait is bounded by a deadline that fails the test with a message.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use super::run::{git, repo, shipinator};

/// Generous: these bound waits for things that take a second, on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `done` until it holds; fails the test saying `what` after [`DEADLINE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < DEADLINE,
            "gave up after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` is a live process (a zombie is dead: it only waits to be reaped).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    let _ = kill_process(pid, sig);
}

/// A `shipinator` process and the processes its steps started, all killed by pid on drop.
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    others: Vec<u32>,
}

impl Running {
    fn start(args: &[&str], cwd: &Path, logs: &Path) -> Self {
        let n = std::fs::read_dir(logs).unwrap().count();
        let stdout = logs.join(format!("{n}.stdout"));
        let stderr = logs.join(format!("{n}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_shipinator"))
            .args(args)
            .current_dir(cwd)
            .env_remove("SHIPINATOR_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            stdout,
            stderr,
            others: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("shipinator to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for pid in &self.others {
            if alive(*pid) {
                signal(*pid, Signal::KILL);
            }
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for a step to write its background process's pid to `path`.
fn read_pid(path: &Path) -> u32 {
    wait_until(&format!("the step to write {}", path.display()), || {
        path.exists()
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn step<'a>(record: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {record}"))
}

fn show(run: &str, cwd: &Path) -> serde_json::Value {
    let out = shipinator(&["runs", "show", run, "--output", "json"], cwd);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    json(&String::from_utf8_lossy(&out.stdout))
}

/// The id of the only run of the data directory under `cwd`.
fn only_run(cwd: &Path) -> String {
    let out = shipinator(&["runs", "list", "--output", "json"], cwd);
    let runs = json(&String::from_utf8_lossy(&out.stdout));
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0]["id"].as_str().unwrap().to_owned()
}

/// A pipeline whose first step starts a background `sleep`, writes its pid to `pid`, and
/// waits: the step's shell has a child of its own, like a real build.
fn long_step_pipeline(pid: &Path) -> String {
    format!(
        r#"
build:
  steps:
    - name: long
      run: |
        sleep 300 &
        echo $! > {pid}.tmp && mv {pid}.tmp {pid}
        wait
    - name: after
      run: 'true'
"#,
        pid = pid.display()
    )
}

#[test]
fn a_step_past_its_timeout_fails_the_run_and_skips_the_rest() {
    let repo = repo(&[(
        ".shipinator.yaml",
        "build:\n  steps:\n    - name: slow\n      run: sleep 300\n      timeout: 1s\n    - name: after\n      run: 'true'\ntest:\n  steps:\n    - name: t\n      run: 'true'\n",
    )]);
    let out = shipinator(&["run", "--output", "json"], repo.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let record = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(record["run"]["status"], "failed");
    assert_eq!(step(&record, "slow")["status"], "failed");
    assert_eq!(step(&record, "after")["status"], "skipped");
    assert_eq!(step(&record, "t")["status"], "skipped");
    let failures: Vec<String> = record["executions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["failure"].as_str().map(str::to_owned))
        .collect();
    assert!(
        failures.iter().any(|f| f.contains("timed out")),
        "the reason names the timeout: {failures:?}"
    );
}

#[test]
fn ctrl_c_cancels_the_run_and_stops_every_process_of_the_step() {
    let scratch = tempfile::tempdir().unwrap();
    let pidfile = scratch.path().join("sleep.pid");
    let repo = repo(&[(".shipinator.yaml", &long_step_pipeline(&pidfile))]);
    let mut run = Running::start(&["run"], repo.path(), scratch.path());
    let sleep = read_pid(&pidfile);
    run.others.push(sleep);
    assert!(alive(sleep));

    signal(run.pid(), Signal::INT);
    let status = run.wait();
    assert_eq!(status.code(), Some(1), "stderr: {}", run.stderr());
    assert!(run.stderr().contains("cancelling run"), "{}", run.stderr());

    let record = show(&only_run(repo.path()), repo.path());
    assert_eq!(record["run"]["status"], "canceled", "{record}");
    assert_eq!(step(&record, "long")["status"], "canceled");
    assert_ne!(step(&record, "after")["status"], "succeeded");
    wait_until("the step's background sleep to be gone", || !alive(sleep));
}

#[test]
fn runs_cancel_from_another_process_cancels_the_running_run() {
    let scratch = tempfile::tempdir().unwrap();
    let pidfile = scratch.path().join("sleep.pid");
    let repo = repo(&[(".shipinator.yaml", &long_step_pipeline(&pidfile))]);
    let mut run = Running::start(&["run"], repo.path(), scratch.path());
    let sleep = read_pid(&pidfile);
    run.others.push(sleep);
    let id = only_run(repo.path());

    let mut cancel = Running::start(
        &["runs", "cancel", &id, "--output", "json"],
        repo.path(),
        scratch.path(),
    );
    assert_eq!(cancel.wait().code(), Some(0), "{}", cancel.stderr());
    let record = json(&cancel.stdout());
    assert_eq!(record["run"]["status"], "canceled");
    assert_eq!(step(&record, "long")["status"], "canceled");

    // The process that drove the run noticed, and ends as a cancelled run does.
    assert_eq!(run.wait().code(), Some(1), "{}", run.stderr());
    assert!(
        run.stderr().contains("another process asked"),
        "{}",
        run.stderr()
    );
    wait_until("the step's background sleep to be gone", || !alive(sleep));

    // Cancelling a finished run says so.
    let again = shipinator(&["runs", "cancel", &id], repo.path());
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended canceled"));
}

#[test]
fn runs_cancel_takes_over_a_run_whose_process_was_killed() {
    let scratch = tempfile::tempdir().unwrap();
    let pidfile = scratch.path().join("sleep.pid");
    let repo = repo(&[(".shipinator.yaml", &long_step_pipeline(&pidfile))]);
    let mut run = Running::start(&["run"], repo.path(), scratch.path());
    let sleep = read_pid(&pidfile);
    run.others.push(sleep);
    signal(run.pid(), Signal::KILL);
    run.wait();
    let id = only_run(repo.path());
    assert!(alive(sleep), "the step outlives the killed engine");

    let mut cancel = Running::start(
        &["runs", "cancel", &id, "--output", "json"],
        repo.path(),
        scratch.path(),
    );
    assert_eq!(cancel.wait().code(), Some(0), "{}", cancel.stderr());
    assert!(cancel.stderr().contains("no process drives run"));
    assert_eq!(json(&cancel.stdout())["run"]["status"], "canceled");
    wait_until("the orphaned step's sleep to be gone", || !alive(sleep));
}

#[test]
fn sigkill_then_resume_finishes_the_run_without_repeating_a_succeeded_step() {
    let scratch = tempfile::tempdir().unwrap();
    let ledger = scratch.path().join("ledger");
    let mark = scratch.path().join("second-started");
    let pidfile = scratch.path().join("sleep.pid");
    // Each step appends its name to the ledger when it completes. The second step blocks the
    // first time (until the engine is killed) and goes straight through when run again.
    let pipeline = format!(
        r#"
build:
  steps:
    - name: first
      run: echo first >> {ledger}
    - name: second
      run: |
        if [ ! -e {mark} ]; then
          touch {mark}
          sleep 300 &
          echo $! > {pid}.tmp && mv {pid}.tmp {pid}
          wait
        fi
        echo second >> {ledger}
    - name: third
      run: echo third >> {ledger}
test:
  steps:
    - name: check
      run: echo check >> {ledger}
"#,
        ledger = ledger.display(),
        mark = mark.display(),
        pid = pidfile.display(),
    );
    let repo = repo(&[(".shipinator.yaml", &pipeline)]);
    let mut run = Running::start(&["run"], repo.path(), scratch.path());
    let sleep = read_pid(&pidfile);
    run.others.push(sleep);
    signal(run.pid(), Signal::KILL);
    run.wait();
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "first\n");

    let mut resumed = Running::start(
        &["run", "--resume", "--output", "json"],
        repo.path(),
        scratch.path(),
    );
    assert_eq!(resumed.wait().code(), Some(0), "{}", resumed.stderr());
    let record = json(&resumed.stdout());
    assert_eq!(record["run"]["status"], "success", "{record}");
    assert_eq!(
        std::fs::read_to_string(&ledger).unwrap(),
        "first\nsecond\nthird\ncheck\n",
        "every step completed exactly once"
    );
    // The step the killed engine left running was stopped, not left behind.
    wait_until("the interrupted step's sleep to be gone", || !alive(sleep));
}

#[test]
fn a_second_run_fetches_into_the_existing_mirror() {
    let pipeline =
        "build:\n  steps:\n    - name: show\n      run: echo \"version $(cat version.txt)\"\n";
    let repo = repo(&[(".shipinator.yaml", pipeline), ("version.txt", "one")]);
    let first = shipinator(&["run"], repo.path());
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let mirrors: Vec<PathBuf> = std::fs::read_dir(repo.path().join(".shipinator/mirrors"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "git"))
        .collect();
    assert_eq!(mirrors.len(), 1, "one bare mirror per repository");
    // A file of our own in the mirror survives only if the mirror is fetched into, not cloned
    // again.
    let marker = mirrors[0].join("kept-by-fetch");
    std::fs::write(&marker, "").unwrap();

    std::fs::write(repo.path().join("version.txt"), "two").unwrap();
    git(repo.path(), &["commit", "-qam", "two"]);
    let second = shipinator(&["run", "--output", "json"], repo.path());
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    let id = json(&String::from_utf8_lossy(&second.stdout))["run"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        marker.exists(),
        "the mirror was replaced instead of fetched into"
    );
    let logs = shipinator(&["logs", &id], repo.path());
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("fetched into the mirror"), "{logs}");
    assert!(logs.contains("version two"), "{logs}");
}

#[test]
fn a_pipeline_in_a_subdirectory_runs_that_directory_of_the_commit_or_of_the_working_tree() {
    let pipeline = "build:\n  steps:\n    - name: show\n      run: test ! -e root.txt && test -e .shipinator.yaml && echo \"data $(cat data.txt)\"\n";
    let repo = repo(&[
        ("root.txt", "at the top"),
        ("pipelines/hello/.shipinator.yaml", pipeline),
        ("pipelines/hello/data.txt", "committed"),
    ]);
    std::fs::write(repo.path().join("pipelines/hello/data.txt"), "edited").unwrap();
    let logs_of = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let id = json(&String::from_utf8_lossy(&out.stdout))["run"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let logs = shipinator(&["logs", &id], repo.path());
        String::from_utf8_lossy(&logs.stdout).into_owned()
    };
    // From the repository's root: the committed tree of that directory...
    let committed = shipinator(&["run", "pipelines/hello", "--output", "json"], repo.path());
    let logs = logs_of(&committed);
    assert!(logs.contains("data committed"), "{logs}");
    // ...or, with --dirty, the directory as it is on disk.
    let dirty = shipinator(
        &["run", "pipelines/hello", "--dirty", "--output", "json"],
        repo.path(),
    );
    let logs = logs_of(&dirty);
    assert!(logs.contains("data edited"), "{logs}");
}

#[test]
fn on_a_terminal_run_shows_live_steps_and_a_summary_table() {
    let repo = repo(&[(
        ".shipinator.yaml",
        "build:\n  steps:\n    - name: compile\n      run: mkdir -p out && echo bits > out/app && echo compiled\n      outputs:\n        - type: binary\n          path: out/app\ntest:\n  steps:\n    - name: unit\n      run: grep -q bits out/app\n",
    )]);
    let bin = env!("CARGO_BIN_EXE_shipinator");
    // `script` (util-linux) runs the command on a pseudo-terminal and copies what it draws.
    let out = Command::new("script")
        .args(["-qfec", &format!("'{bin}' run"), "/dev/null"])
        .current_dir(repo.path())
        .env("TERM", "xterm-256color")
        .env_remove("SHIPINATOR_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("`script` from util-linux runs the terminal test");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{screen}");
    for expected in [
        "build/compile",
        "test/unit",
        "succeeded",
        "STEP",
        "SHA256",
        "out/app",
    ] {
        assert!(screen.contains(expected), "no {expected:?} in {screen}");
    }
    // The live view redraws its lines (terminal control sequences), which the plain output
    // never contains; the summary is a table.
    assert!(screen.contains("\x1b["), "no live redraws: {screen}");
    assert!(screen.contains('│'), "{screen}");
    let sum = sha2_hex(b"bits\n");
    assert!(
        screen.contains(&sum),
        "the artifact's sha256 is shown: {screen}"
    );
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
