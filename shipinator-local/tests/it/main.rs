//! Integration tests of the worker runtime and the local executor: real processes, real git
//! repositories (file://), real files.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod read_at_ref;
mod support;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shipinator_core::artifact::{ArtifactMeta, ArtifactStore, GetOptions};
use shipinator_core::domain::{ArtifactId, ArtifactType, ExecutionId, JobType, RunId};
use shipinator_core::executor::{
    ExecutionResult, ExecutionSpec, ExecutionState, Executor, InputArtifact, OutputDecl, SourceSpec,
};
use shipinator_core::logs::{LogLine, LogStore, LogStream};
use shipinator_core::memory::{InMemoryArtifactStore, InMemoryLogStore};
use shipinator_local::process::ProcessIdentity;
use shipinator_local::worker::BaseEnv;
use shipinator_local::{LOST_ON_RESTART, LocalExecutor};
use support::*;

struct Env {
    dir: tempfile::TempDir,
    artifacts: Arc<InMemoryArtifactStore>,
    logs: Arc<InMemoryLogStore>,
    exec: LocalExecutor,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = Arc::new(InMemoryArtifactStore::new());
    let logs = Arc::new(InMemoryLogStore::default());
    let exec = executor(&dir, &artifacts, &logs);
    Env {
        dir,
        artifacts,
        logs,
        exec,
    }
}

fn executor(
    dir: &tempfile::TempDir,
    artifacts: &Arc<InMemoryArtifactStore>,
    logs: &Arc<InMemoryLogStore>,
) -> LocalExecutor {
    LocalExecutor::builder(dir.path().join("data"))
        .artifact_store(Arc::clone(artifacts) as Arc<dyn ArtifactStore>)
        .log_store(Arc::clone(logs) as _)
        .grace_period(Duration::from_millis(500))
        .build()
        .unwrap()
}

async fn run(env: &Env, spec: &ExecutionSpec) -> ExecutionState {
    let handle = env.exec.submit(spec).await.unwrap();
    wait_terminal(&env.exec, &handle).await
}

fn finished(state: ExecutionState) -> ExecutionResult {
    match state {
        ExecutionState::Finished(r) => r,
        other => panic!("expected Finished, got {other:?}"),
    }
}

async fn lines(env: &Env, id: ExecutionId) -> Vec<LogLine> {
    env.logs.read(id, 0, usize::MAX).await.unwrap()
}

async fn stdout(env: &Env, spec: &ExecutionSpec) -> Vec<String> {
    lines(env, spec.execution_id)
        .await
        .into_iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.text)
        .collect()
}

/// Whether the log is closed: following it then ends.
async fn is_closed(env: &Env, id: ExecutionId) -> bool {
    use futures_util::StreamExt;
    let follow = env.logs.follow(id, 0).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), follow.collect::<Vec<_>>())
        .await
        .is_ok()
}

/// Waits (bounded) until the execution has logged a line.
async fn wait_for_output(env: &Env, id: ExecutionId) {
    for _ in 0..3000 {
        if !lines(env, id).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no output within 30 s");
}

async fn bytes(env: &Env, id: ArtifactId) -> Vec<u8> {
    use futures_util::StreamExt;
    let read = env.artifacts.get(id, GetOptions::default()).await.unwrap();
    let chunks: Vec<_> = read.body.collect().await;
    chunks
        .into_iter()
        .flat_map(|c| c.unwrap().to_vec())
        .collect()
}

fn source(url: &str, commit: &str) -> Option<SourceSpec> {
    Some(SourceSpec {
        clone_url: url.to_owned(),
        commit: commit.to_owned(),
        git_ref: "main".to_owned(),
        copy_working_tree: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_is_cloned_at_the_exact_commit_and_the_mirror_is_fetched_later() {
    let env = env();
    let repo_dir = env.dir.path().join("repo");
    let url = repo(&repo_dir);
    let first = commit(&repo_dir, "version.txt", "one\n");
    let _later = commit(&repo_dir, "version.txt", "two\n");

    let mut spec = spec("cat version.txt; git rev-parse HEAD");
    spec.source = source(&url, &first);
    let result = finished(run(&env, &spec).await);
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert_eq!(
        stdout(&env, &spec).await,
        vec!["one".to_owned(), first.clone()]
    );

    // The mirror exists once; a later run with a new commit fetches into it.
    let mirrors: Vec<_> = std::fs::read_dir(env.dir.path().join("data/mirrors"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "git"))
        .collect();
    assert_eq!(mirrors.len(), 1);
    let mirror = mirrors[0].path();
    let inode = std::fs::metadata(&mirror).unwrap().ino();
    let third = commit(&repo_dir, "version.txt", "three\n");

    let mut spec2 = spec_in(RunId::new_v7(), JobType::Build, 0, "cat version.txt");
    spec2.source = source(&url, &third);
    let result = finished(run(&env, &spec2).await);
    assert_eq!(result.exit_code, 0, "{result:?}");
    assert_eq!(stdout(&env, &spec2).await, vec!["three".to_owned()]);
    assert_eq!(
        std::fs::metadata(&mirror).unwrap().ino(),
        inode,
        "mirror was re-cloned"
    );
    let system: Vec<String> = lines(&env, spec2.execution_id)
        .await
        .into_iter()
        .filter(|l| l.stream == LogStream::System)
        .map(|l| l.text)
        .collect();
    assert!(
        system.iter().any(|l| l.contains("fetched into the mirror")),
        "{system:?}"
    );

    // The second step of the same stage reuses the workspace (no clone, sees earlier files).
    let mut step2 = spec_in(spec2.run_id, JobType::Build, 1, "cat marker.txt");
    step2.source = spec2.source.clone();
    let mut step1b = spec_in(spec2.run_id, JobType::Build, 2, "echo kept > marker.txt");
    step1b.source = spec2.source.clone();
    assert_eq!(finished(run(&env, &step1b).await).exit_code, 0);
    assert_eq!(finished(run(&env, &step2).await).exit_code, 0);
    assert_eq!(stdout(&env, &step2).await, vec!["kept".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_protocols_and_unknown_commits_fail_clearly() {
    let env = env();
    let mut spec = spec("true");
    spec.source = source("ext::sh -c touch% /tmp/pwned", "");
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, -1);
    assert!(
        r.failure
            .as_deref()
            .unwrap()
            .contains("only file://, https:// and ssh://"),
        "{r:?}"
    );

    let repo_dir = env.dir.path().join("repo");
    let url = repo(&repo_dir);
    commit(&repo_dir, "a", "a");
    let mut spec = spec_in(RunId::new_v7(), JobType::Build, 0, "true");
    spec.source = source(&url, "0123456789abcdef0123456789abcdef01234567");
    let r = finished(run(&env, &spec).await);
    assert!(r.failure.as_deref().unwrap().contains("is not in"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn working_tree_is_copied_without_git_and_data_dir() {
    let env = env();
    let tree = env.dir.path().join("tree");
    std::fs::create_dir_all(tree.join(".git")).unwrap();
    std::fs::create_dir_all(tree.join("src")).unwrap();
    std::fs::write(tree.join("src/main.c"), "int main(){return 0;}\n").unwrap();
    let data = tree.join(".shipinator");
    let exec = LocalExecutor::builder(&data)
        .artifact_store(Arc::clone(&env.artifacts) as _)
        .log_store(Arc::clone(&env.logs) as _)
        .build()
        .unwrap();
    let mut spec = spec("find . -not -path './.shipinator*' | sort");
    spec.source = Some(SourceSpec {
        clone_url: tree.display().to_string(),
        commit: String::new(),
        git_ref: String::new(),
        copy_working_tree: true,
    });
    let handle = exec.submit(&spec).await.unwrap();
    assert_eq!(finished(wait_terminal(&exec, &handle).await).exit_code, 0);
    let ls = stdout(&env, &spec).await;
    assert_eq!(ls, vec![".", "./src", "./src/main.c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_are_materialized_and_verified() {
    let env = env();
    let payload = b"#!/bin/sh\necho built binary says hi\n".to_vec();
    let id = ArtifactId::new_v7();
    let stored = env
        .artifacts
        .put(
            id,
            ArtifactMeta::default(),
            Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from(
                payload.clone(),
            ))])),
        )
        .await
        .unwrap();
    let input = InputArtifact {
        id,
        artifact_type: ArtifactType::Binary,
        checksum: Some(stored.checksum.clone()),
        path: Some("bin/hello".to_owned()),
        name: Some("hello".to_owned()),
    };
    let mut spec = spec_in(RunId::new_v7(), JobType::Test, 0, "./bin/hello");
    spec.inputs = vec![input.clone()];
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(stdout(&env, &spec).await, vec!["built binary says hi"]);

    // A checksum that does not match fails before the command runs.
    let mut bad = spec_in(RunId::new_v7(), JobType::Test, 0, "echo should not run");
    bad.inputs = vec![InputArtifact {
        checksum: Some(format!("sha256:{}", "0".repeat(64))),
        ..input.clone()
    }];
    let r = finished(run(&env, &bad).await);
    assert_eq!(r.exit_code, -1);
    let failure = r.failure.unwrap();
    assert!(
        failure.contains("is corrupt") && failure.contains("bin/hello"),
        "{failure}"
    );
    assert!(stdout(&env, &bad).await.is_empty());

    // A path escaping the workspace is refused.
    let mut escape = spec_in(RunId::new_v7(), JobType::Test, 0, "true");
    escape.inputs = vec![InputArtifact {
        path: Some("../../evil".to_owned()),
        ..input
    }];
    let r = finished(run(&env, &escape).await);
    assert!(
        r.failure
            .unwrap()
            .contains("must be relative and stay inside")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_is_found_on_the_steps_own_path_and_keeps_its_name() {
    use std::os::unix::fs::PermissionsExt;
    let env = env();
    let bin = env.dir.path().join("own-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("greet");
    std::fs::write(&tool, "#!/bin/sh\necho \"$0 in $(pwd -P)\" \"$@\"\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A file of the same name that is not executable comes first: it is skipped, as `execvp`
    // skips it.
    let shadow = env.dir.path().join("shadow");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(shadow.join("greet"), "not a program").unwrap();
    let mut own = spec("unused");
    own.command = vec!["greet".to_owned(), "a b".to_owned()];
    own.env.insert(
        "PATH".to_owned(),
        format!("{}:{}:/usr/bin:/bin", shadow.display(), bin.display()),
    );
    let r = finished(run(&env, &own).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    let out = stdout(&env, &own).await;
    let workspace = env
        .dir
        .path()
        .join("data/workspaces")
        .join(&own.workspace.key);
    let workspace = workspace.canonicalize().unwrap();
    // A script is started by its full path, as `execvp` starts it.
    assert_eq!(
        out,
        vec![format!("{} in {} a b", tool.display(), workspace.display())]
    );

    // `sh` itself keeps `sh` as its name.
    let zero = spec("echo \"$0\"");
    let r = finished(run(&env, &zero).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(stdout(&env, &zero).await, vec!["sh".to_owned()]);

    // A program found nowhere fails to start, with its name in the failure.
    let mut missing = spec("unused");
    missing.command = vec!["no-such-program-anywhere".to_owned()];
    let r = finished(run(&env, &missing).await);
    assert_eq!(r.exit_code, shipinator_local::worker::EXIT_NOT_RUN);
    assert!(
        r.failure
            .as_deref()
            .is_some_and(|f| f.contains("no-such-program-anywhere")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_see_their_env_and_not_the_engines() {
    let env = env();
    let mut spec = spec("env");
    spec.env
        .insert("GREETING".to_owned(), "hello world".to_owned());
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0);
    let out = stdout(&env, &spec).await;
    assert!(out.contains(&"GREETING=hello world".to_owned()), "{out:?}");
    assert!(
        out.contains(&format!("SHIPINATOR_RUN_ID={}", spec.run_id)),
        "{out:?}"
    );
    assert!(
        out.iter().any(|l| l.starts_with("SHIPINATOR_WORKSPACE=/")),
        "{out:?}"
    );
    let names: Vec<&str> = out
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for (engine_var, _) in std::env::vars() {
        if ["PATH", "HOME", "LANG", "PWD", "SHLVL", "_", "OLDPWD"].contains(&engine_var.as_str()) {
            continue;
        }
        // The step's own variables (its env and the workspace) may share a name with one of the
        // engine's, when the engine itself runs inside a step.
        if spec.env.contains_key(&engine_var) || engine_var == "SHIPINATOR_WORKSPACE" {
            continue;
        }
        assert!(
            !names.contains(&engine_var.as_str()),
            "engine variable {engine_var} leaked"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_passed_through_reach_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = Arc::new(InMemoryArtifactStore::new());
    let logs = Arc::new(InMemoryLogStore::default());
    let exec = LocalExecutor::builder(dir.path().join("data"))
        .artifact_store(Arc::clone(&artifacts) as Arc<dyn ArtifactStore>)
        .log_store(Arc::clone(&logs) as _)
        .base_env(BaseEnv::from_process().pass(["CARGO_MANIFEST_DIR", "SHIPINATOR_TEST_UNSET"]))
        .build()
        .unwrap();
    let env = Env {
        dir,
        artifacts,
        logs,
        exec,
    };
    let spec = spec("echo \"$CARGO_MANIFEST_DIR\"; echo \"${SHIPINATOR_TEST_UNSET-unset}\"");
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    // This process's value (cargo sets it at run time too; the compile-time value may name
    // where the test was built rather than where it runs).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    assert_eq!(
        stdout(&env, &spec).await,
        vec![manifest_dir, "unset".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_helpers_do_not_see_user_env() {
    let env = env();
    let repo_dir = env.dir.path().join("repo");
    let url = repo(&repo_dir);
    let c = commit(&repo_dir, "f", "x");
    // Each of these would break (or redirect) git if it reached the clone.
    let mut spec = spec("echo $GIT_DIR");
    spec.source = source(&url, &c);
    for (k, v) in [
        ("GIT_DIR", "/nonexistent"),
        ("GIT_ALLOW_PROTOCOL", "ext"),
        ("GIT_CONFIG_PARAMETERS", "'core.bare'='not-a-bool'"),
    ] {
        spec.env.insert(k.to_owned(), v.to_owned());
    }
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(stdout(&env, &spec).await, vec!["/nonexistent"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_sequenced_in_order_and_tagged() {
    let env = env();
    let spec = spec("for i in 1 2 3 4 5; do echo out$i; done; echo err >&2; printf 'no newline'");
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        r.logs_uri.as_deref(),
        Some(format!("logs://{}", spec.execution_id).as_str())
    );
    let lines = lines(&env, spec.execution_id).await;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.seq, i as u64);
    }
    assert!(lines.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(
        stdout(&env, &spec).await,
        vec!["out1", "out2", "out3", "out4", "out5", "no newline"]
    );
    let err: Vec<_> = lines
        .iter()
        .filter(|l| l.stream == LogStream::Stderr)
        .map(|l| l.text.as_str())
        .collect();
    assert_eq!(err, vec!["err"]);
    assert!(is_closed(&env, spec.execution_id).await);
    // Through the executor too.
    use futures_util::StreamExt;
    let handle = env.exec.submit(&spec).await.unwrap();
    let read: Vec<_> = env
        .exec
        .logs(&handle, 2)
        .await
        .unwrap()
        .map(|l| l.unwrap().seq)
        .collect()
        .await;
    assert_eq!(read.first(), Some(&2));
    assert_eq!(read.len(), lines.len() - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_the_whole_process_group() {
    let env = env();
    // The shell ignores TERM, so KILL after the grace period is needed too.
    let mut spec = spec("trap '' TERM; sleep 1000 & sleep 1000 & echo $$; wait");
    spec.timeout = Some(Duration::from_millis(300));
    let handle = env.exec.submit(&spec).await.unwrap();
    let id = spec.execution_id;
    wait_for_output(&env, id).await;
    let pgid: u32 = stdout(&env, &spec).await[0].parse().unwrap();
    let r = finished(wait_terminal(&env.exec, &handle).await);
    assert_ne!(r.exit_code, 0);
    assert!(
        r.failure
            .as_deref()
            .unwrap()
            .contains("timed out after 300 ms"),
        "{r:?}"
    );
    assert_eq!(live_group_members(pgid), Vec::<u32>::new());
    assert!(!env.exec.pidfile_path(id).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_group_and_is_a_no_op_afterwards() {
    let env = env();
    let spec = spec("sleep 1000 & echo $$; wait");
    let handle = env.exec.submit(&spec).await.unwrap();
    let id = spec.execution_id;
    wait_for_output(&env, id).await;
    let pgid: u32 = stdout(&env, &spec).await[0].parse().unwrap();
    let pidfile = ProcessIdentity::read_pidfile(&env.exec.pidfile_path(id))
        .unwrap()
        .unwrap();
    assert_eq!(pidfile.pid, pgid);
    env.exec.cancel(&handle).await.unwrap();
    assert_eq!(
        env.exec.status(&handle).await.unwrap(),
        ExecutionState::Canceled
    );
    assert_eq!(live_group_members(pgid), Vec::<u32>::new());
    env.exec.cancel(&handle).await.unwrap();
    assert_eq!(
        env.exec.status(&handle).await.unwrap(),
        ExecutionState::Canceled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_idempotent_and_reports_are_pushed() {
    use futures_util::StreamExt;
    let env = env();
    let mut reports = env.exec.reports().unwrap();
    assert!(env.exec.reports().is_none());
    let spec = spec("echo once >> count.txt; cat count.txt");
    let a = env.exec.submit(&spec).await.unwrap();
    let b = env.exec.submit(&spec).await.unwrap();
    assert_eq!(a, b);
    let report = reports.next().await.unwrap();
    assert_eq!(report.execution_id, spec.execution_id);
    assert_eq!(finished(report.state).exit_code, 0);
    let _ = env.exec.submit(&spec).await.unwrap();
    assert_eq!(stdout(&env, &spec).await, vec!["once"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_collected_byte_identical_with_metadata() {
    let env = env();
    let junit = r#"<?xml version="1.0"?>
<testsuites><testsuite name="s" tests="4">
  <testcase name="a"/>
  <testcase name="b"><failure message="boom"/></testcase>
  <testcase name="c"><skipped/></testcase>
  <testcase name="d"></testcase>
</testsuite></testsuites>"#;
    let script = format!(
        "mkdir -p bin reports && head -c 300000 /dev/urandom > bin/app && chmod 755 bin/app \
         && cat > reports/junit.xml <<'XML'\n{junit}\nXML\necho 'total 87%' > coverage.txt"
    );
    let mut spec = spec(&script);
    let decl = |ty, path: &str| OutputDecl {
        artifact_type: ty,
        path: Some(path.to_owned()),
        image_ref: None,
        name: None,
    };
    spec.outputs = vec![
        OutputDecl {
            name: Some("app".to_owned()),
            ..decl(ArtifactType::Binary, "bin/app")
        },
        decl(ArtifactType::TestReport, "reports/junit.xml"),
        decl(ArtifactType::Coverage, "coverage.txt"),
        OutputDecl {
            artifact_type: ArtifactType::OciImage,
            path: None,
            image_ref: Some("registry.example/app:1".to_owned()),
            name: Some("image".to_owned()),
        },
    ];
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(r.failure, None);
    assert_eq!(r.artifacts.len(), 4);
    let ws = env
        .dir
        .path()
        .join("data/workspaces")
        .join(&spec.workspace.key);
    let on_disk = std::fs::read(ws.join("bin/app")).unwrap();
    let bin = &r.artifacts[0];
    assert_eq!(bin.name.as_deref(), Some("app"));
    assert_eq!(bytes(&env, bin.id).await.as_slice(), on_disk.as_slice());
    assert_eq!(bin.size, 300_000);
    assert_eq!(
        bin.checksum.as_deref(),
        Some(format!("sha256:{}", hex::encode(Sha256::digest(&on_disk))).as_str())
    );
    assert_eq!(
        bin.metadata.get("file_mode").map(String::as_str),
        Some("755")
    );
    let report = &r.artifacts[1].metadata;
    assert_eq!(
        [
            &report["tests"],
            &report["passed"],
            &report["failed"],
            &report["skipped"]
        ],
        ["4", "2", "1", "1"]
    );
    assert_eq!(r.artifacts[2].artifact_type, ArtifactType::Coverage);
    let image = &r.artifacts[3];
    assert_eq!(image.storage_backend, "none");
    assert_eq!(image.metadata["ref"], "registry.example/app:1");

    // The artifact is the test stage's input, executable again.
    let mut test = spec_in(
        spec.run_id,
        JobType::Test,
        0,
        "test -x bin/app && cmp bin/app ../build/bin/app && echo same",
    );
    test.inputs = vec![InputArtifact {
        id: bin.id,
        artifact_type: ArtifactType::Binary,
        checksum: bin.checksum.clone(),
        path: Some("bin/app".to_owned()),
        name: None,
    }];
    let r = finished(run(&env, &test).await);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(stdout(&env, &test).await, vec!["same"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_output_fails_and_failed_tests_keep_their_report() {
    let env = env();
    let mut spec = spec("true");
    spec.outputs = vec![OutputDecl {
        artifact_type: ArtifactType::Binary,
        path: Some("bin/nothing".to_owned()),
        image_ref: None,
        name: None,
    }];
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 0);
    let failure = r.failure.unwrap();
    assert!(
        failure.contains("'bin/nothing' was not produced"),
        "{failure}"
    );

    let mut spec = spec_in(
        RunId::new_v7(),
        JobType::Test,
        0,
        "echo '<testsuite><testcase name=\"x\"><failure/></testcase></testsuite>' > junit.xml; exit 3",
    );
    spec.outputs = vec![
        OutputDecl {
            artifact_type: ArtifactType::TestReport,
            path: Some("junit.xml".to_owned()),
            image_ref: None,
            name: None,
        },
        OutputDecl {
            artifact_type: ArtifactType::Binary,
            path: Some("never".to_owned()),
            image_ref: None,
            name: None,
        },
    ];
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.exit_code, 3);
    assert_eq!(r.failure, None);
    assert_eq!(r.artifacts.len(), 1);
    assert_eq!(r.artifacts[0].metadata["failed"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_archive_output_records_the_manifest_digest() {
    let env = env();
    let digest = "sha256:".to_owned() + &"ab".repeat(32);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":1}}]}}"#
    );
    let script = format!(
        "mkdir -p layout && printf '%s' '{index}' > layout/index.json && echo '{{\"imageLayoutVersion\":\"1.0.0\"}}' > layout/oci-layout && tar -C layout -cf image.tar ."
    );
    let mut spec = spec(&script);
    spec.outputs = vec![OutputDecl {
        artifact_type: ArtifactType::OciImage,
        path: Some("image.tar".to_owned()),
        image_ref: Some("hello:1".to_owned()),
        name: None,
    }];
    let r = finished(run(&env, &spec).await);
    assert_eq!(r.failure, None, "{r:?}");
    assert_eq!(r.artifacts[0].metadata["digest"], digest);
    assert_eq!(r.artifacts[0].metadata["ref"], "hello:1");
    assert_eq!(r.artifacts[0].storage_backend, "memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_engine_stops_a_live_step_and_reports_it_lost() {
    let env = env();
    let spec = spec("unused");
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 1000 & wait"])
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let identity = ProcessIdentity::of(pid).unwrap();
    identity
        .write_pidfile(&env.exec.pidfile_path(spec.execution_id))
        .unwrap();
    wait_until(|| live_group_members(pid).len() == 2).await;

    let handle = env.exec.submit(&spec).await.unwrap(); // adopts, starts nothing
    let state = env.exec.status(&handle).await.unwrap();
    assert_eq!(
        state,
        ExecutionState::Lost {
            reason: LOST_ON_RESTART.to_owned()
        }
    );
    let _ = child.wait().unwrap();
    assert_eq!(live_group_members(pid), Vec::<u32>::new());
    assert!(!env.exec.pidfile_path(spec.execution_id).exists());
    // The answer is recorded: a new executor object says the same.
    let again = executor(&env.dir, &env.artifacts, &env.logs);
    assert_eq!(again.status(&handle).await.unwrap(), state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_pid_is_never_signalled() {
    let env = env();
    let spec = spec("unused");
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .spawn()
        .unwrap();
    let real = ProcessIdentity::of(child.id()).unwrap();
    let recycled = ProcessIdentity {
        start_time: real.start_time.saturating_sub(1),
        ..real
    };
    recycled
        .write_pidfile(&env.exec.pidfile_path(spec.execution_id))
        .unwrap();
    let handle = env.exec.submit(&spec).await.unwrap();
    let state = env.exec.status(&handle).await.unwrap();
    assert!(
        matches!(state, ExecutionState::Lost { ref reason } if reason != LOST_ON_RESTART),
        "{state:?}"
    );
    assert!(
        real.is_alive(),
        "a process with a recycled pid was signalled"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_execution_is_lost_not_an_error() {
    let env = env();
    let spec = spec("unused");
    let handle = shipinator_core::executor::ExecHandle {
        execution_id: spec.execution_id,
        external_id: "local:x".to_owned(),
    };
    assert!(matches!(
        env.exec.status(&handle).await.unwrap(),
        ExecutionState::Lost { .. }
    ));
    env.exec.cancel(&handle).await.unwrap();
}

#[test]
fn junit_parser_counts_cases() {
    use shipinator_local::worker::{TestCounts, parse_junit};
    assert_eq!(parse_junit("not xml <"), None);
    assert_eq!(parse_junit("<html/>"), None);
    assert_eq!(
        parse_junit(
            r#"<testsuite><testcase/><testcase><error/></testcase><testcase><skipped/></testcase></testsuite>"#
        ),
        Some(TestCounts {
            tests: 3,
            passed: 1,
            failed: 1,
            skipped: 1
        })
    );
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn example_pipelines_and_the_repository_config_are_valid() {
    let mut files = vec![repo_root().join(".shipinator.yaml")];
    for entry in std::fs::read_dir(repo_root().join("examples/pipelines")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.is_dir() {
            files.push(dir.join(".shipinator.yaml"));
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(e) = shipinator_core::config::parse(&file.display().to_string(), &text) {
            panic!("{}: {e}", file.display());
        }
    }
}

/// The hello example, stage by stage, through the executor: the test stage runs the build's
/// binary from the artifact store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_example_builds_and_tests_from_the_artifact() {
    let env = env();
    let dir = repo_root().join("examples/pipelines/hello");
    let text = std::fs::read_to_string(dir.join(".shipinator.yaml")).unwrap();
    let pipeline = shipinator_core::config::parse("hello", &text).unwrap();
    let run_id = RunId::new_v7();
    let ctx = shipinator_core::config::TemplateContext::default();
    let mut inputs = Vec::new();
    for stage in [JobType::Build, JobType::Test] {
        let stage_spec = pipeline.stage(stage).unwrap();
        for (i, step) in stage_spec.steps.iter().enumerate() {
            let mut spec = spec_in(run_id, stage, u32::try_from(i).unwrap(), &step.run);
            spec.source = Some(SourceSpec {
                clone_url: dir.display().to_string(),
                commit: String::new(),
                git_ref: String::new(),
                copy_working_tree: true,
            });
            spec.inputs = inputs.clone();
            spec.outputs = step
                .outputs
                .iter()
                .map(|o| OutputDecl {
                    artifact_type: o.artifact_type,
                    path: o.path.as_ref().map(|p| p.render(&ctx)),
                    image_ref: o.image_ref.as_ref().map(|p| p.render(&ctx)),
                    name: o.name.clone(),
                })
                .collect();
            let r = finished(run(&env, &spec).await);
            assert_eq!(
                (r.exit_code, &r.failure),
                (0, &None),
                "{}: {:?}",
                step.name,
                lines(&env, spec.execution_id).await
            );
            if stage == JobType::Test && step.name == "report" {
                assert_eq!(r.artifacts[0].metadata["passed"], "3");
                assert_eq!(r.artifacts[1].artifact_type, ArtifactType::Coverage);
            }
            for a in r.artifacts {
                inputs.push(InputArtifact {
                    id: a.id,
                    artifact_type: a.artifact_type,
                    checksum: a.checksum,
                    path: a.path,
                    name: a.name,
                });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_steps_share_one_prepared_workspace() {
    use futures_util::StreamExt;
    let env = env();
    let mut reports = env.exec.reports().unwrap();
    let repo_dir = env.dir.path().join("repo");
    let url = repo(&repo_dir);
    let c = commit(&repo_dir, "shared.txt", "from git\n");
    let run_id = RunId::new_v7();
    let mut specs = Vec::new();
    for i in 0..4 {
        let mut s = spec_in(
            run_id,
            JobType::Test,
            i,
            &format!("cat shared.txt; echo {i} > out-{i}"),
        );
        s.source = source(&url, &c);
        specs.push(s);
    }
    for s in &specs {
        env.exec.submit(s).await.unwrap();
    }
    for _ in 0..specs.len() {
        let r = finished(reports.next().await.unwrap().state);
        assert_eq!((r.exit_code, r.failure), (0, None));
    }
    let mut clones = 0;
    for s in &specs {
        clones += lines(&env, s.execution_id)
            .await
            .iter()
            .filter(|l| {
                l.stream == LogStream::System && l.text.contains("cloned into a new mirror")
            })
            .count();
    }
    assert_eq!(clones, 1);
    let ws = shipinator_local::worker::workspace_dir(
        &shipinator_local::DataDir::new(env.dir.path().join("data")),
        &specs[0].workspace.key,
    )
    .unwrap();
    for i in 0..4 {
        assert!(ws.join(format!("out-{i}")).exists());
    }
    shipinator_local::worker::remove_run_workspaces(
        &shipinator_local::DataDir::new(env.dir.path().join("data")),
        run_id,
    )
    .unwrap();
    assert!(!ws.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_never_land_outside_through_a_symlinked_directory() {
    let env = env();
    let outside = env.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let tree = env.dir.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::os::unix::fs::symlink(&outside, tree.join("bin")).unwrap();
    let id = ArtifactId::new_v7();
    env.artifacts
        .put(
            id,
            ArtifactMeta::default(),
            Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from_static(
                b"x",
            ))])),
        )
        .await
        .unwrap();
    let mut spec = spec("true");
    spec.source = Some(SourceSpec {
        clone_url: tree.display().to_string(),
        commit: String::new(),
        git_ref: String::new(),
        copy_working_tree: true,
    });
    spec.inputs = vec![InputArtifact {
        id,
        artifact_type: ArtifactType::Binary,
        checksum: None,
        path: Some("bin/app".to_owned()),
        name: None,
    }];
    let r = finished(run(&env, &spec).await);
    assert!(r.failure.unwrap().contains("stay inside the workspace"));
    assert!(!outside.join("app").exists());
}

/// Drives [`LocalExecutor`] through core's executor conformance suite.
#[derive(Debug)]
struct Harness {
    dir: tempfile::TempDir,
    artifacts: Arc<InMemoryArtifactStore>,
    logs: Arc<InMemoryLogStore>,
    executor: Arc<LocalExecutor>,
}

#[async_trait::async_trait]
impl shipinator_core::conformance::executor::ExecutorHarness for Harness {
    fn executor(&self) -> Arc<dyn Executor> {
        Arc::clone(&self.executor) as _
    }

    fn spec_that_succeeds(&self, lines: &[String]) -> ExecutionSpec {
        let mut spec = shipinator_core::conformance::executor::base_spec("succeeds");
        let script: String = lines
            .iter()
            .map(|l| format!("printf '%s\\n' '{}'; ", l.replace('\'', "'\\''")))
            .collect();
        spec.command = vec!["sh".to_owned(), "-c".to_owned(), format!("{script}true")];
        spec
    }

    fn spec_that_runs_long(&self) -> ExecutionSpec {
        let mut spec = shipinator_core::conformance::executor::base_spec("runs-long");
        spec.command = vec!["sh".to_owned(), "-c".to_owned(), "sleep 1000".to_owned()];
        spec
    }

    async fn restart(&self) -> Arc<dyn Executor> {
        Arc::new(executor(&self.dir, &self.artifacts, &self.logs))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_executor_conformance_suite() {
    let env = env();
    let harness = Harness {
        executor: Arc::new(env.exec.clone()),
        dir: env.dir,
        artifacts: env.artifacts,
        logs: env.logs,
    };
    shipinator_core::conformance::executor::all(
        &harness,
        &shipinator_core::conformance::executor::ExecutorCaps::default(),
    )
    .await;
    // Nothing the suite started is left running: every pidfile goes once its process group is
    // reaped, which for the last cancel may happen just after the suite returns.
    let pidfiles = || {
        std::fs::read_dir(harness.dir.path().join("data/executions"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pidfiles() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pidfiles(), 0, "pidfiles left after the suite");
}
