//! Read-only facts about a local git repository (top level, HEAD commit, current branch),
//! read from the `.git` directory itself: the CLI never shells out to git.

use std::fs;
use std::path::{Path, PathBuf};

/// What `shipinator run` needs to know about the repository holding a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitInfo {
    /// The working tree's top-level directory.
    pub(crate) toplevel: PathBuf,
    /// The commit HEAD points at; `None` in a repository without commits.
    pub(crate) head: Option<String>,
    /// The branch HEAD points at; `None` when detached.
    pub(crate) branch: Option<String>,
}

/// Finds the repository containing `dir` (walking up), or `None` when there is none.
pub(crate) fn discover(dir: &Path) -> std::io::Result<Option<GitInfo>> {
    let dir = dir.canonicalize()?;
    for candidate in dir.ancestors() {
        let dot_git = candidate.join(".git");
        let git_dir = if dot_git.is_dir() {
            dot_git
        } else if dot_git.is_file() {
            // A linked worktree or submodule: `gitdir: <path>`.
            let text = fs::read_to_string(&dot_git)?;
            match text.trim().strip_prefix("gitdir:") {
                Some(p) => candidate.join(p.trim()),
                None => continue,
            }
        } else {
            continue;
        };
        let (head, branch) = read_head(&git_dir)?;
        return Ok(Some(GitInfo {
            toplevel: candidate.to_path_buf(),
            head,
            branch,
        }));
    }
    Ok(None)
}

fn read_head(git_dir: &Path) -> std::io::Result<(Option<String>, Option<String>)> {
    let head = fs::read_to_string(git_dir.join("HEAD"))?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return Ok((is_sha(head).then(|| head.to_owned()), None));
    };
    let reference = reference.trim();
    let branch = reference.strip_prefix("refs/heads/").map(str::to_owned);
    Ok((resolve_ref(git_dir, reference)?, branch))
}

/// Resolves a ref through loose refs, then `packed-refs` (also in the common dir of a worktree).
fn resolve_ref(git_dir: &Path, reference: &str) -> std::io::Result<Option<String>> {
    let common = match fs::read_to_string(git_dir.join("commondir")) {
        Ok(c) => git_dir.join(c.trim()),
        Err(_) => git_dir.to_path_buf(),
    };
    for dir in [git_dir, common.as_path()] {
        if let Ok(text) = fs::read_to_string(dir.join(reference)) {
            let text = text.trim();
            if let Some(next) = text.strip_prefix("ref:") {
                return resolve_ref(git_dir, next.trim());
            }
            if is_sha(text) {
                return Ok(Some(text.to_owned()));
            }
        }
        if let Ok(packed) = fs::read_to_string(dir.join("packed-refs")) {
            for line in packed.lines() {
                if let Some((sha, name)) = line.split_once(' ')
                    && name == reference
                    && is_sha(sha)
                {
                    return Ok(Some(sha.to_owned()));
                }
            }
        }
    }
    Ok(None)
}

fn is_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_loose_and_packed_refs() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        fs::create_dir_all(git.join("refs/heads")).unwrap();
        fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        fs::write(git.join("refs/heads/main"), format!("{sha}\n")).unwrap();
        let sub = dir.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        let info = discover(&sub).unwrap().unwrap();
        assert_eq!(info.toplevel, dir.path().canonicalize().unwrap());
        assert_eq!(info.head.as_deref(), Some(sha));
        assert_eq!(info.branch.as_deref(), Some("main"));

        fs::remove_file(git.join("refs/heads/main")).unwrap();
        let other = "89abcdef0123456789abcdef0123456789abcdef";
        fs::write(
            git.join("packed-refs"),
            format!("# pack-refs\n{other} refs/heads/main\n"),
        )
        .unwrap();
        assert_eq!(
            discover(dir.path()).unwrap().unwrap().head.as_deref(),
            Some(other)
        );

        fs::write(git.join("HEAD"), format!("{sha}\n")).unwrap();
        let detached = discover(dir.path()).unwrap().unwrap();
        assert_eq!(
            (detached.head.as_deref(), detached.branch),
            (Some(sha), None)
        );
    }

    #[test]
    fn linked_worktree_resolves_through_the_common_dir() {
        let dir = tempfile::tempdir().unwrap();
        let common = dir.path().join("main/.git");
        let wt_git = common.join("worktrees/feature");
        fs::create_dir_all(common.join("refs/heads")).unwrap();
        fs::create_dir_all(&wt_git).unwrap();
        let sha = "fedcba9876543210fedcba9876543210fedcba98";
        fs::write(common.join("refs/heads/feature"), format!("{sha}\n")).unwrap();
        fs::write(wt_git.join("HEAD"), "ref: refs/heads/feature\n").unwrap();
        fs::write(wt_git.join("commondir"), "../..\n").unwrap();
        let tree = dir.path().join("feature");
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join(".git"), format!("gitdir: {}\n", wt_git.display())).unwrap();
        let info = discover(&tree).unwrap().unwrap();
        assert_eq!(info.toplevel, tree.canonicalize().unwrap());
        assert_eq!(info.head.as_deref(), Some(sha));
        assert_eq!(info.branch.as_deref(), Some("feature"));
    }
}
