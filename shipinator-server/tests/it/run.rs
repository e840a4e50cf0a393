//! `shipinator run` end to end: the real binary on real git repositories in temp directories,
//! with SQLite state, the filesystem artifact store and local processes.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

pub(crate) fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?} failed");
}

/// A git repository holding `files`, committed on branch `main`.
pub(crate) fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "init"]);
    dir
}

pub(crate) fn shipinator(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shipinator"))
        .args(args)
        .current_dir(cwd)
        .env_remove("SHIPINATOR_DATA_DIR")
        .output()
        .unwrap()
}

const PIPELINE: &str = r#"
build:
  steps:
    - name: make
      run: mkdir -p out && printf 'payload %s\n' "$SHIPINATOR_BRANCH" > out/app.bin && echo built
      outputs:
        - type: binary
          path: out/app.bin
test:
  steps:
    - name: sees-build-artifact
      run: grep -q 'payload main' out/app.bin
      parallel: true
    - name: second
      run: echo second
      parallel: true
"#;

#[test]
fn run_succeeds_and_artifacts_match_what_the_step_wrote() {
    let repo = repo(&[(".shipinator.yaml", PIPELINE)]);
    let out = shipinator(&["run", "--output", "json"], repo.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no terminal control sequences off a terminal: {stderr}"
    );
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["run"]["status"], "success");
    assert_eq!(record["run"]["phase"], "tested");
    let steps = record["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert!(
        steps.iter().all(|s| s["status"] == "succeeded"),
        "{steps:?}"
    );

    let artifact = &record["artifacts"].as_array().unwrap()[0];
    assert_eq!(artifact["artifact_type"], "binary");
    let expected = b"payload main\n";
    let sum = format!("sha256:{}", hex(&Sha256::digest(expected)));
    assert_eq!(artifact["checksum"], sum.as_str());
    assert_eq!(artifact["size"], expected.len());

    // Download it back through the CLI: byte-identical.
    let id = artifact["id"].as_str().unwrap();
    let target = repo.path().join("downloaded.bin");
    let dl = shipinator(
        &["artifacts", "download", id, "-o", target.to_str().unwrap()],
        repo.path(),
    );
    assert_eq!(
        dl.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&dl.stderr)
    );
    assert_eq!(std::fs::read(&target).unwrap(), expected);

    // The run is listed, and its logs are readable.
    let list = shipinator(&["runs", "list", "--output", "json"], repo.path());
    let runs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(runs["runs"][0]["id"], record["run"]["id"]);
    let run_id = record["run"]["id"].as_str().unwrap();
    let logs = shipinator(&["logs", run_id, "--step", "make"], repo.path());
    assert!(String::from_utf8_lossy(&logs.stdout).contains("[build/make] built"));
}

#[test]
fn a_failing_step_fails_the_run_and_skips_the_rest() {
    let repo = repo(&[(
        ".shipinator.yaml",
        "build:\n  steps:\n    - name: ok\n      run: 'true'\n    - name: boom\n      run: exit 3\n    - name: after\n      run: 'true'\ntest:\n  steps:\n    - name: t\n      run: 'true'\n",
    )]);
    let out = shipinator(&["run", "--output", "json"], repo.path());
    assert_eq!(out.status.code(), Some(1));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["run"]["status"], "failed");
    let status = |name: &str| {
        record["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("ok"), "succeeded");
    assert_eq!(status("boom"), "failed");
    assert_eq!(status("after"), "skipped");
    assert_eq!(status("t"), "skipped");
    let exec = record["executions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["exit_code"] == 3)
        .cloned();
    assert!(exec.is_some(), "the failing step's exit code is recorded");
}

#[test]
fn usage_errors_exit_2() {
    let repo = repo(&[(".shipinator.yaml", PIPELINE)]);
    // No deploy section (and no Kubernetes target) → a clear usage error.
    let out = shipinator(&["run", "--stages", "deploy"], repo.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deploy"));
    // An invalid file: exit 2 with the located error.
    let bad = repo_with_bad_config();
    let out = shipinator(&["run"], bad.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean 'run'"));
    // Nothing to resume.
    let out = shipinator(&["run", "--resume"], repo.path());
    assert_eq!(out.status.code(), Some(2));
}

fn repo_with_bad_config() -> tempfile::TempDir {
    repo(&[(
        ".shipinator.yaml",
        "build:\n  steps:\n    - name: x\n      runn: 'true'\n",
    )])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
