//! Reading a file of a repository at a branch, tag or commit, through the mirror.

use shipinator_local::DataDir;
use shipinator_local::worker::{BaseEnv, FileAtRef, read_at_ref};

use crate::support::{commit, git, repo};

async fn read(data: &DataDir, url: &str, reference: &str, path: &str) -> Result<FileAtRef, String> {
    read_at_ref(data, &BaseEnv::from_process(), url, reference, path, 1024)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn branches_tags_and_commits_are_read_from_the_remote_not_the_working_tree() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path().join("data"));
    let repo_dir = dir.path().join("repo");
    let url = repo(&repo_dir);
    let first = commit(&repo_dir, "ci.yaml", "one\n");
    git(&repo_dir, &["tag", "v1"]);
    git(&repo_dir, &["checkout", "-q", "-b", "feature/x"]);
    let feature = commit(&repo_dir, "ci.yaml", "feature\n");
    git(&repo_dir, &["checkout", "-q", "main"]);
    // Uncommitted changes in the working tree are never what is read.
    std::fs::write(repo_dir.join("ci.yaml"), "dirty\n").unwrap();

    let main = read(&data, &url, "main", "ci.yaml").await.unwrap();
    assert_eq!(
        main,
        FileAtRef {
            commit: first.clone(),
            text: "one\n".to_owned()
        }
    );
    let other = read(&data, &url, "feature/x", "ci.yaml").await.unwrap();
    assert_eq!(
        other,
        FileAtRef {
            commit: feature.clone(),
            text: "feature\n".to_owned()
        }
    );
    assert_eq!(
        read(&data, &url, "v1", "ci.yaml").await.unwrap().commit,
        first
    );
    assert_eq!(
        read(&data, &url, &feature, "ci.yaml").await.unwrap().text,
        "feature\n"
    );
    assert_eq!(
        read(&data, &url, &feature[..10], "ci.yaml")
            .await
            .unwrap()
            .commit,
        feature
    );

    // A branch that moves is fetched again: the mirror does not answer with the old commit.
    git(&repo_dir, &["checkout", "-q", "--", "ci.yaml"]);
    let second = commit(&repo_dir, "ci.yaml", "two\n");
    let moved = read(&data, &url, "main", "ci.yaml").await.unwrap();
    assert_eq!(
        moved,
        FileAtRef {
            commit: second,
            text: "two\n".to_owned()
        }
    );
}

#[tokio::test]
async fn unknown_refs_missing_files_and_unsafe_input_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path().join("data"));
    let repo_dir = dir.path().join("repo");
    let url = repo(&repo_dir);
    commit(&repo_dir, "ci.yaml", "one\n");
    std::fs::create_dir_all(repo_dir.join("sub")).unwrap();
    commit(&repo_dir, "sub/big", &"x".repeat(2000));

    let e = read(&data, &url, "nope", "ci.yaml").await.unwrap_err();
    assert!(e.contains("no branch, tag or commit named 'nope'"), "{e}");
    let e = read(&data, &url, "main", "missing.yaml").await.unwrap_err();
    assert!(e.contains("has no file 'missing.yaml'"), "{e}");
    let e = read(&data, &url, "main", "sub").await.unwrap_err();
    assert!(e.contains("has no file 'sub'"), "{e}");
    let e = read(&data, &url, "main", "sub/big").await.unwrap_err();
    assert!(e.contains("more than the limit of 1024"), "{e}");
    for bad in [
        "--upload-pack=touch",
        "a..b",
        "main@{1}",
        "x y",
        "",
        ".hidden",
        "a/.b",
    ] {
        let e = read(&data, &url, bad, "ci.yaml").await.unwrap_err();
        assert!(
            e.contains("is not a usable branch, tag or commit name"),
            "{bad}: {e}"
        );
    }
    for bad in ["../ci.yaml", "/etc/passwd", ""] {
        let e = read(&data, &url, "main", bad).await.unwrap_err();
        assert!(
            e.contains("must be a relative path inside the repository"),
            "{bad}: {e}"
        );
    }
    let e = read(&data, "ext::sh -c true", "main", "ci.yaml")
        .await
        .unwrap_err();
    assert!(e.contains("only file://, https:// and ssh://"), "{e}");
}
