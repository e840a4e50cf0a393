//! The git CLI as an engine helper: a fixed, clean environment and only the file, https and
//! ssh protocols.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::worker::step::BaseEnv;

/// Protocols git may use, for the clone and for anything it runs (submodules).
pub const ALLOWED_PROTOCOLS: &str = "file:https:ssh";

/// Runs git with a clean environment.
#[derive(Debug, Clone)]
pub(crate) struct Git {
    env: Vec<(&'static str, OsString)>,
}

impl Git {
    pub(crate) fn new(base: &BaseEnv) -> Self {
        let mut env = base.vars();
        env.retain(|(k, _)| *k != "LANG");
        env.extend([
            ("LANG", OsString::from("C")),
            ("LC_ALL", OsString::from("C")),
            ("GIT_TERMINAL_PROMPT", OsString::from("0")),
            ("GIT_ALLOW_PROTOCOL", OsString::from(ALLOWED_PROTOCOLS)),
            ("GIT_CONFIG_NOSYSTEM", OsString::from("1")),
        ]);
        // ssh clones authenticate through the engine's agent, when it has one.
        if let Some(sock) = std::env::var_os("SSH_AUTH_SOCK") {
            env.push(("SSH_AUTH_SOCK", sock));
        }
        Self { env }
    }

    /// Runs `git <args>` in `cwd`; its standard output on success.
    pub(crate) async fn run(&self, cwd: Option<&Path>, args: &[&OsStr]) -> Result<String, Error> {
        let out = self.run_bytes(cwd, args).await?;
        Ok(String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Runs `git <args>` in `cwd`; its standard output, as bytes, on success.
    pub(crate) async fn run_bytes(
        &self,
        cwd: Option<&Path>,
        args: &[&OsStr],
    ) -> Result<Vec<u8>, Error> {
        let mut cmd = tokio::process::Command::new("git");
        cmd.args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let printable = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = cmd
            .output()
            .await
            .map_err(|e| Error::io(format!("running `git {printable}` (is git installed?)"), e))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            Err(Error::Git {
                args: printable,
                status: out.status.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            })
        }
    }

    /// Whether `git <args>` succeeds (its output is ignored).
    pub(crate) async fn check(&self, cwd: Option<&Path>, args: &[&OsStr]) -> bool {
        self.run(cwd, args).await.is_ok()
    }
}

/// Checks that `url` uses an allowed protocol; returns what to hand git.
pub(crate) fn checked_url(url: &str) -> Result<OsString, Error> {
    let refuse = || Error::ProtocolNotAllowed {
        url: url.to_owned(),
    };
    if url.starts_with('-') {
        return Err(refuse());
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return match scheme {
            "file" | "https" | "ssh" => Ok(url.into()),
            _ => Err(refuse()),
        };
    }
    if Path::new(url).is_absolute() {
        return Ok(url.into());
    }
    // scp-like `user@host:path` is ssh; `transport::address` helpers are refused.
    if url.contains("::") {
        return Err(refuse());
    }
    match url.split_once(':') {
        Some((host, _)) if !host.contains('/') && !host.is_empty() => Ok(url.into()),
        _ => Err(refuse()),
    }
}

/// Checks that `commit` is a hexadecimal object name (so it can never be taken for an option).
pub(crate) fn checked_commit(commit: &str) -> Result<&str, Error> {
    if (4..=64).contains(&commit.len()) && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(commit)
    } else {
        Err(Error::Spec {
            reason: format!("'{commit}' is not a commit id (expected a hexadecimal sha)"),
        })
    }
}

/// Checks that `reference` can only be read as a ref name or an object name: what
/// `git check-ref-format` accepts for a branch or tag (one level or more), or a hexadecimal sha.
pub(crate) fn checked_ref(reference: &str) -> Result<&str, Error> {
    let bad = |why: &str| Error::Spec {
        reason: format!("'{reference}' is not a usable branch, tag or commit name: {why}"),
    };
    if reference.is_empty() || reference.len() > 255 {
        return Err(bad("it must have 1 to 255 characters"));
    }
    if reference.starts_with('-') || reference.starts_with('/') || reference.ends_with('/') {
        return Err(bad("it must not start with '-' or '/', or end with '/'"));
    }
    if reference.contains("..") || reference.contains("@{") || reference.contains("//") {
        return Err(bad("it must not contain '..', '@{' or '//'"));
    }
    if reference.ends_with(".lock") || reference.ends_with('.') || reference == "@" {
        return Err(bad("it must not end with '.lock' or '.', or be '@'"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '+');
    if !reference.chars().all(allowed) {
        return Err(bad(
            "only letters, digits and '/', '.', '_', '-', '+' are accepted",
        ));
    }
    if reference.split('/').any(|part| part.starts_with('.')) {
        return Err(bad("no part of it may start with '.'"));
    }
    Ok(reference)
}

/// The bare mirror of `url` under `mirrors`.
pub(crate) fn mirror_path(mirrors: &Path, url: &str) -> PathBuf {
    let digest = Sha256::digest(url.as_bytes());
    mirrors.join(format!("{}.git", &hex::encode(digest)[..24]))
}

/// How the mirror was brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MirrorUpdate {
    /// Cloned for the first time.
    Cloned,
    /// Fetched into the existing mirror.
    Fetched,
    /// The commit was already there.
    UpToDate,
}

/// Makes sure the mirror of `url` exists and contains `commit` (when given).
pub(crate) async fn ensure_mirror(
    git: &Git,
    mirror: &Path,
    url: &OsStr,
    commit: Option<&str>,
) -> Result<MirrorUpdate, Error> {
    let has_commit = |c: String| async move {
        git.check(
            Some(mirror),
            &[OsStr::new("cat-file"), OsStr::new("-e"), OsStr::new(&c)],
        )
        .await
    };
    let update = if mirror.join("HEAD").exists() {
        if let Some(c) = commit
            && has_commit(format!("{c}^{{commit}}")).await
        {
            return Ok(MirrorUpdate::UpToDate);
        }
        git.run(
            Some(mirror),
            &[
                OsStr::new("fetch"),
                OsStr::new("--prune"),
                OsStr::new("--quiet"),
                OsStr::new("origin"),
            ],
        )
        .await?;
        MirrorUpdate::Fetched
    } else {
        let mut tmp = mirror.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io_at("removing", &tmp, e))?;
        }
        git.run(
            None,
            &[
                OsStr::new("clone"),
                OsStr::new("--mirror"),
                OsStr::new("--quiet"),
                OsStr::new("--"),
                url,
                tmp.as_os_str(),
            ],
        )
        .await?;
        std::fs::rename(&tmp, mirror).map_err(|e| Error::io_at("renaming into", mirror, e))?;
        MirrorUpdate::Cloned
    };
    if let Some(c) = commit
        && !has_commit(format!("{c}^{{commit}}")).await
    {
        return Err(Error::Spec {
            reason: format!(
                "commit {c} is not in {} (was it pushed?)",
                url.to_string_lossy()
            ),
        });
    }
    Ok(update)
}

/// Checks `commit` (or the mirror's HEAD) out of `mirror` into the new directory `dest`.
/// `shared` borrows the mirror's objects (cheap, but `dest` then needs the mirror); otherwise
/// the clone has its own.
pub(crate) async fn checkout(
    git: &Git,
    mirror: &Path,
    dest: &Path,
    commit: Option<&str>,
    shared: bool,
) -> Result<(), Error> {
    git.run(
        None,
        &[
            OsStr::new("clone"),
            OsStr::new(if shared { "--shared" } else { "--local" }),
            OsStr::new("--no-checkout"),
            OsStr::new("--quiet"),
            OsStr::new("--"),
            mirror.as_os_str(),
            dest.as_os_str(),
        ],
    )
    .await?;
    git.run(
        Some(dest),
        &[
            OsStr::new("-c"),
            OsStr::new("advice.detachedHead=false"),
            OsStr::new("checkout"),
            OsStr::new("--quiet"),
            OsStr::new("--detach"),
            OsStr::new(commit.unwrap_or("HEAD")),
        ],
    )
    .await?;
    Ok(())
}
