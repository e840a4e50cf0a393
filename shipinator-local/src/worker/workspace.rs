//! Preparing a stage's workspace: source, then the inputs of earlier stages. Done once per run
//! and stage; later steps of the stage find it ready.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use shipinator_core::artifact::{ArtifactStore, GetOptions};
use shipinator_core::domain::ArtifactType;
use shipinator_core::executor::{ExecutionSpec, InputArtifact, SourceSpec};

use crate::data_dir::DataDir;
use crate::error::{Error, safe_join};
use crate::worker::git::{self, Git, MirrorUpdate};
use crate::worker::log::LogSink;
use crate::worker::step::BaseEnv;

/// Metadata key under which the worker records a collected file's permission bits (octal).
pub const FILE_MODE_KEY: &str = "file_mode";

/// The directory of a workspace key (`<run-id>/<stage>`) under `workspaces`.
///
/// # Errors
/// The key is empty or not a plain relative path.
pub fn workspace_dir(data_dir: &DataDir, key: &str) -> Result<PathBuf, Error> {
    let invalid = || Error::InvalidWorkspaceKey {
        key: key.to_owned(),
    };
    let mut out = data_dir.workspaces();
    let mut parts = 0;
    for comp in Path::new(key).components() {
        match comp {
            Component::Normal(c) if !c.to_string_lossy().ends_with(".ready") => {
                out.push(c);
                parts += 1;
            }
            _ => return Err(invalid()),
        }
    }
    if parts == 0 {
        return Err(invalid());
    }
    Ok(out)
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An exclusive lock on a file, held until dropped (`flock`, so it also excludes other
/// processes sharing the data directory).
#[derive(Debug)]
struct FileLock(#[allow(dead_code)] File);

async fn lock(path: PathBuf) -> Result<FileLock, Error> {
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io_at("creating", parent, e))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io_at("opening lock", &path, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io_at("locking", &path, e.into()))?;
        Ok(FileLock(file))
    })
    .await
    .map_err(|e| Error::io("lock task", io::Error::other(e)))?
}

/// Prepares the workspace of `spec.workspace` and returns its directory.
///
/// Idempotent: the first call for a key clones (or copies) the source and materializes
/// `spec.inputs`, then writes a marker; every later call (the stage's next steps, a retried
/// attempt) returns at once. Concurrent calls (a parallel group) wait for the first.
///
/// # Errors
/// The source cannot be cloned or copied, or an input cannot be fetched or is corrupt.
pub async fn prepare_workspace(
    spec: &ExecutionSpec,
    data_dir: &DataDir,
    artifacts: &dyn ArtifactStore,
    base_env: &BaseEnv,
    log: &mut LogSink,
) -> Result<PathBuf, Error> {
    let ws = workspace_dir(data_dir, &spec.workspace.key)?;
    let marker = sibling(&ws, ".ready");
    if marker.exists() {
        return Ok(ws);
    }
    let _lock = lock(sibling(&ws, ".lock")).await?;
    if marker.exists() {
        return Ok(ws);
    }
    if ws.exists() {
        // Left over from an attempt that died half-way.
        std::fs::remove_dir_all(&ws).map_err(|e| Error::io_at("removing", &ws, e))?;
    }
    match &spec.source {
        Some(source) if source.copy_working_tree => {
            log.system(format!("copying the working tree {}", source.clone_url))
                .await;
            let from = PathBuf::from(&source.clone_url);
            let to = ws.clone();
            let exclude = data_dir.root().to_path_buf();
            tokio::task::spawn_blocking(move || copy_tree(&from, &to, &exclude))
                .await
                .map_err(|e| Error::io("copy task", io::Error::other(e)))??;
        }
        Some(source) => clone_source(source, data_dir, &ws, base_env, log).await?,
        None => std::fs::create_dir_all(&ws).map_err(|e| Error::io_at("creating", &ws, e))?,
    }
    for input in &spec.inputs {
        materialize_input(input, &ws, artifacts, log).await?;
    }
    std::fs::write(&marker, b"").map_err(|e| Error::io_at("writing", &marker, e))?;
    Ok(ws)
}

async fn clone_source(
    source: &SourceSpec,
    data_dir: &DataDir,
    ws: &Path,
    base_env: &BaseEnv,
    log: &mut LogSink,
) -> Result<(), Error> {
    let url = git::checked_url(&source.clone_url)?;
    let commit = if source.commit.is_empty() {
        None
    } else {
        Some(git::checked_commit(&source.commit)?)
    };
    let git = Git::new(base_env);
    let mirrors = data_dir.mirrors();
    std::fs::create_dir_all(&mirrors).map_err(|e| Error::io_at("creating", &mirrors, e))?;
    let mirror = git::mirror_path(&mirrors, &source.clone_url);
    let update = {
        let _lock = lock(sibling(&mirror, ".lock")).await?;
        git::ensure_mirror(&git, &mirror, &url, commit).await?
    };
    let what = match update {
        MirrorUpdate::Cloned => "cloned into a new mirror",
        MirrorUpdate::Fetched => "fetched into the mirror",
        MirrorUpdate::UpToDate => "already in the mirror",
    };
    log.system(format!(
        "{} at {}: {what}",
        source.clone_url,
        commit.unwrap_or("HEAD")
    ))
    .await;
    if let Some(parent) = ws.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io_at("creating", parent, e))?;
    }
    git::checkout(
        &git,
        &mirror,
        ws,
        commit,
        !data_dir.has_separate_workspaces(),
    )
    .await
}

/// Exports the directory `subdir` of `commit` in the repository at `clone_url` (through its
/// mirror under the data directory) and returns where: `<data>/sources/<key>/`, keyed by URL,
/// commit and subdirectory, so a second call (a resumed or retried run) finds it ready.
///
/// This is how a pipeline living in a subdirectory of a repository runs its committed tree:
/// the run's source is then a copy of the export, whose root is the directory holding the
/// `.shipinator.yaml`.
///
/// # Errors
/// The URL, commit or subdirectory is unsafe; git fails; the commit has no such directory.
pub async fn export_subtree(
    data_dir: &DataDir,
    base_env: &BaseEnv,
    clone_url: &str,
    commit: &str,
    subdir: &str,
) -> Result<PathBuf, Error> {
    let url = git::checked_url(clone_url)?;
    let commit = git::checked_commit(commit)?;
    let sources = data_dir.root().join("sources");
    // Validates `subdir` (relative, inside the tree) before anything is created.
    safe_join(&sources, subdir)?;
    let key = {
        let mut h = Sha256::new();
        for part in [clone_url, commit, subdir] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    };
    let dest = sources.join(&key[..24]);
    let marker = sibling(&dest, ".ready");
    if marker.exists() {
        return Ok(dest);
    }
    let _lock = lock(sibling(&dest, ".lock")).await?;
    if marker.exists() {
        return Ok(dest);
    }
    let git = Git::new(base_env);
    let mirrors = data_dir.mirrors();
    std::fs::create_dir_all(&mirrors).map_err(|e| Error::io_at("creating", &mirrors, e))?;
    let mirror = git::mirror_path(&mirrors, clone_url);
    {
        let _lock = lock(sibling(&mirror, ".lock")).await?;
        git::ensure_mirror(&git, &mirror, &url, Some(commit)).await?;
    }
    let tmp = sibling(&dest, ".tmp");
    for stale in [&tmp, &dest] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| Error::io_at("removing", stale, e))?;
        }
    }
    git::checkout(&git, &mirror, &tmp, Some(commit), true).await?;
    let inner = safe_join(&tmp, subdir)?;
    if !inner.is_dir() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Spec {
            reason: format!("commit {commit} has no directory '{subdir}' (is it committed?)"),
        });
    }
    std::fs::rename(&inner, &dest).map_err(|e| Error::io_at("renaming into", &dest, e))?;
    std::fs::remove_dir_all(&tmp).map_err(|e| Error::io_at("removing", &tmp, e))?;
    std::fs::write(&marker, b"").map_err(|e| Error::io_at("writing", &marker, e))?;
    Ok(dest)
}

/// A file read out of a repository at a ref (see [`read_at_ref`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAtRef {
    /// The commit the ref named when it was read (full hexadecimal sha).
    pub commit: String,
    /// The file's text.
    pub text: String,
}

/// Reads the file `path` of the commit that `reference` (a branch, a tag or a commit sha) names
/// in the repository at `clone_url`, through the repository's mirror under the data directory:
/// the mirror is cloned or fetched first, so a branch is read as the remote has it now, and the
/// working tree of a `file://` repository is never looked at.
///
/// The server uses it to create a pipeline from the `.shipinator.yaml` a repository holds.
///
/// # Errors
/// The URL, ref or path is unsafe; git fails (unreachable remote, unknown ref); the commit has
/// no such file; the file is larger than `max_bytes` or not UTF-8.
pub async fn read_at_ref(
    data_dir: &DataDir,
    base_env: &BaseEnv,
    clone_url: &str,
    reference: &str,
    path: &str,
    max_bytes: u64,
) -> Result<FileAtRef, Error> {
    let url = git::checked_url(clone_url)?;
    let reference = git::checked_ref(reference)?;
    let outside = || Error::Spec {
        reason: format!("'{path}' must be a relative path inside the repository"),
    };
    let mut rel = PathBuf::new();
    for comp in Path::new(path).components() {
        match comp {
            Component::Normal(c) => rel.push(c),
            _ => return Err(outside()),
        }
    }
    let Some(rel) = rel.to_str().filter(|r| !r.is_empty()) else {
        return Err(outside());
    };
    let git = Git::new(base_env);
    let mirrors = data_dir.mirrors();
    std::fs::create_dir_all(&mirrors).map_err(|e| Error::io_at("creating", &mirrors, e))?;
    let mirror = git::mirror_path(&mirrors, clone_url);
    let _lock = lock(sibling(&mirror, ".lock")).await?;
    // A full sha already in the mirror needs no fetch; a branch or tag may have moved.
    let pinned = (reference.len() == 40 || reference.len() == 64)
        && reference.bytes().all(|b| b.is_ascii_hexdigit());
    git::ensure_mirror(&git, &mirror, &url, pinned.then_some(reference)).await?;
    let commit = git
        .run(
            Some(&mirror),
            &[
                OsStr::new("rev-parse"),
                OsStr::new("--verify"),
                OsStr::new("--quiet"),
                OsStr::new("--end-of-options"),
                OsStr::new(&format!("{reference}^{{commit}}")),
            ],
        )
        .await
        .map_err(|_| Error::Spec {
            reason: format!("{clone_url} has no branch, tag or commit named '{reference}'"),
        })?
        .trim()
        .to_owned();
    let object = format!("{commit}:{rel}");
    let missing = || Error::Spec {
        reason: format!("commit {commit} ('{reference}') of {clone_url} has no file '{rel}'"),
    };
    let kind = git
        .run(
            Some(&mirror),
            &[
                OsStr::new("cat-file"),
                OsStr::new("-t"),
                OsStr::new(&object),
            ],
        )
        .await
        .map_err(|_| missing())?;
    if kind.trim() != "blob" {
        return Err(missing());
    }
    let size: u64 = git
        .run(
            Some(&mirror),
            &[
                OsStr::new("cat-file"),
                OsStr::new("-s"),
                OsStr::new(&object),
            ],
        )
        .await?
        .trim()
        .parse()
        .map_err(|_| Error::Spec {
            reason: format!("git reported no size for '{rel}' at {commit}"),
        })?;
    if size > max_bytes {
        return Err(Error::Spec {
            reason: format!(
                "'{rel}' at commit {commit} is {size} bytes, more than the limit of {max_bytes}"
            ),
        });
    }
    let bytes = git
        .run_bytes(
            Some(&mirror),
            &[
                OsStr::new("cat-file"),
                OsStr::new("blob"),
                OsStr::new(&object),
            ],
        )
        .await?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Spec {
        reason: format!("'{rel}' at commit {commit} is not UTF-8 text"),
    })?;
    Ok(FileAtRef { commit, text })
}

/// Copies the directory `from` to `to`, skipping `.git` and `exclude` (the data directory, if
/// it lies inside). Symbolic links are recreated, not followed.
fn copy_tree(from: &Path, to: &Path, exclude: &Path) -> Result<(), Error> {
    let exclude = exclude.canonicalize().ok();
    let from_meta = std::fs::metadata(from).map_err(|e| Error::io_at("reading", from, e))?;
    if !from_meta.is_dir() {
        return Err(Error::Spec {
            reason: format!("{} is not a directory", from.display()),
        });
    }
    let mut stack = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = stack.pop() {
        std::fs::create_dir_all(&dst).map_err(|e| Error::io_at("creating", &dst, e))?;
        let entries = std::fs::read_dir(&src).map_err(|e| Error::io_at("reading", &src, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io_at("reading", &src, e))?;
            let name = entry.file_name();
            if name == OsStr::new(".git") {
                continue;
            }
            let s = entry.path();
            let d = dst.join(&name);
            let ty = entry
                .file_type()
                .map_err(|e| Error::io_at("reading", &s, e))?;
            if ty.is_dir() {
                if exclude.is_some() && s.canonicalize().ok() == exclude {
                    continue;
                }
                stack.push((s, d));
            } else if ty.is_symlink() {
                let target = std::fs::read_link(&s).map_err(|e| Error::io_at("reading", &s, e))?;
                std::os::unix::fs::symlink(&target, &d)
                    .map_err(|e| Error::io_at("creating", &d, e))?;
            } else if ty.is_file() {
                std::fs::copy(&s, &d).map_err(|e| Error::io_at("copying", &s, e))?;
            }
        }
    }
    Ok(())
}

/// Fetches one input artifact into the workspace and verifies its checksum.
async fn materialize_input(
    input: &InputArtifact,
    ws: &Path,
    artifacts: &dyn ArtifactStore,
    log: &mut LogSink,
) -> Result<(), Error> {
    let Some(rel) = &input.path else {
        return Ok(());
    };
    let dest = safe_join(ws, rel)?;
    let read = artifacts
        .get(
            input.id,
            GetOptions {
                range: None,
                verify_checksum: true,
            },
        )
        .await
        .map_err(|e| Error::artifact(format!("fetching input artifact {}", input.id), e))?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io_at("creating", parent, e))?;
        // A directory of the checkout may be a symbolic link leading out of the workspace.
        let inside = match (parent.canonicalize(), ws.canonicalize()) {
            (Ok(p), Ok(root)) => p.starts_with(root),
            _ => false,
        };
        if !inside {
            return Err(Error::UnsafePath { path: rel.clone() });
        }
    }
    let tmp = sibling(&dest, ".shipinator-partial");
    let mut file = File::create(&tmp).map_err(|e| Error::io_at("creating", &tmp, e))?;
    let mut hasher = Sha256::new();
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("reading input artifact {}", input.id), e)
        })?;
        hasher.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| Error::io_at("writing", &tmp, e))?;
    }
    drop(file);
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    let expected = input
        .checksum
        .clone()
        .unwrap_or_else(|| read.stored.checksum.clone());
    if !expected.eq_ignore_ascii_case(&actual) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::ChecksumMismatch {
            id: input.id,
            path: rel.clone(),
            expected,
            actual,
        });
    }
    let mode = read
        .stored
        .meta
        .extra
        .get(FILE_MODE_KEY)
        .and_then(|m| u32::from_str_radix(m, 8).ok())
        .unwrap_or(match input.artifact_type {
            ArtifactType::Binary => 0o755,
            _ => 0o644,
        });
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| Error::io_at("setting permissions of", &tmp, e))?;
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io_at("renaming into", &dest, e))?;
    log.system(format!(
        "input {} {} placed at {rel} ({actual})",
        input.artifact_type,
        input.name.as_deref().unwrap_or("artifact"),
    ))
    .await;
    Ok(())
}

/// Removes every workspace of `run` (all its stages), e.g. when the run has ended. Missing
/// workspaces are fine.
///
/// # Errors
/// A directory exists but cannot be removed.
pub fn remove_run_workspaces(
    data_dir: &DataDir,
    run: shipinator_core::domain::RunId,
) -> Result<(), Error> {
    let dir = data_dir.workspaces().join(run.to_string());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io_at("removing", &dir, e)),
    }
}
