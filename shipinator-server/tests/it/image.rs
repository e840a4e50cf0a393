//! The server's OCI image (scripts/oci-image.sh) and the manifests the deploy stage applies
//! (scripts/k8s-manifest.sh), built from this test binary's `shipinator` without a container
//! engine: every digest checked, the layer unpacked, and the binary run from it under `chroot`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn repository_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap().to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// scripts/oci-image.sh on `binary`; returns the digest it printed.
fn build_image(binary: &str, out: &Path) -> String {
    let output = run(Command::new("bash")
        .arg(repository_root().join("scripts/oci-image.sh"))
        .arg(out)
        .env("IMAGE_BINARY", binary)
        .env("IMAGE_TAG", "test"));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A program's path, from PATH.
fn which(program: &str) -> String {
    let out = run(Command::new("bash").args(["-c", &format!("type -P {program}")]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The blob a descriptor names, after checking its size and digest.
fn blob(layout: &Path, descriptor: &serde_json::Value) -> Vec<u8> {
    let digest = descriptor["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").unwrap();
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&bytes), hex, "content of {digest}");
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "size of {digest}"
    );
    bytes
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Runs `command` inside `root` as root, or, when this process is not root, in a user namespace
/// where it is.
fn chroot(root: &Path, userspec: Option<&str>, command: &[&str]) -> Output {
    let is_root = rustix::process::geteuid().is_root();
    let mut cmd = if is_root {
        Command::new("chroot")
    } else {
        let mut c = Command::new("unshare");
        c.args(["-r", "chroot"]);
        c
    };
    if let (Some(spec), true) = (userspec, is_root) {
        cmd.arg(format!("--userspec={spec}"));
    }
    // Only a PATH to find chroot (in /usr/sbin) on the host; the image sets its own.
    cmd.arg(root).args(command).env_clear().env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    cmd.output().unwrap()
}

#[test]
fn the_server_image_holds_everything_the_binary_needs() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("out/image.tar");
    let digest = build_image(env!("CARGO_BIN_EXE_shipinator"), &archive);
    assert!(
        digest.starts_with("sha256:") && digest.len() == 7 + 64,
        "{digest}"
    );

    // What the worker records for an `oci_image` output.
    assert_eq!(
        shipinator_local::worker::oci_manifest_digest(&archive),
        Ok(digest.clone())
    );

    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    assert_eq!(
        json(&std::fs::read(layout.join("oci-layout")).unwrap()),
        serde_json::json!({"imageLayoutVersion": "1.0.0"})
    );
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let descriptors = index["manifests"].as_array().unwrap();
    assert_eq!(descriptors.len(), 1, "{index}");
    assert_eq!(descriptors[0]["digest"], digest.as_str());
    assert_eq!(
        descriptors[0]["annotations"]["org.opencontainers.image.ref.name"],
        "test"
    );

    let manifest = json(&blob(&layout, &descriptors[0]));
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config = json(&blob(&layout, &manifest["config"]));
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/shipinator"])
    );
    assert_eq!(config["config"]["User"], "65532:65532");
    let env = config["config"]["Env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e.as_str().unwrap().starts_with("PATH=")),
        "{env:?}"
    );

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&layout, &layers[0]);
    let layer_path = dir.path().join("layer.tar.gz");
    std::fs::write(&layer_path, &layer).unwrap();
    let uncompressed = run(Command::new("gzip").arg("-dc").arg(&layer_path)).stdout;
    assert_eq!(
        config["rootfs"],
        serde_json::json!({"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&uncompressed))]})
    );

    // Deterministic entries: owned by root, time 0; /tmp writable by all, sticky.
    let listing = run(Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(&layer_path))
    .stdout;
    let listing = String::from_utf8(listing).unwrap();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "0/0", "{line}");
        assert_eq!(&fields[3..5], ["1970-01-01", "00:00"], "{line}");
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with(" tmp/")),
        "{listing}"
    );

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&layer_path)
        .arg("-C")
        .arg(&rootfs));
    // Nothing but the binary, what it loads, and the few files of a user and TLS.
    let entrypoint = rootfs.join("usr/local/bin/shipinator");
    assert_eq!(
        std::fs::read(&entrypoint).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_shipinator")).unwrap()
    );
    // The image's own user runs it, from the image alone.
    let out = chroot(
        &rootfs,
        Some("65532:65532"),
        &["/usr/local/bin/shipinator", "--version"],
    );
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("shipinator {}", env!("CARGO_PKG_VERSION"))
    );
    // It parses its configuration there too (a real command, not only --version).
    let out = chroot(
        &rootfs,
        Some("65532:65532"),
        &["/usr/local/bin/shipinator", "schema"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"$schema\""));

    // The same binary gives the same image.
    assert_eq!(
        build_image(
            env!("CARGO_BIN_EXE_shipinator"),
            &dir.path().join("again.tar")
        ),
        digest
    );
}

#[test]
fn the_image_script_refuses_what_it_cannot_pack() {
    let dir = tempfile::tempdir().unwrap();
    let script = repository_root().join("scripts/oci-image.sh");
    let refused = |envs: &[(&str, &str)]| {
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir.path().join("image.tar"))
            .envs(envs.iter().copied())
            .env("CARGO_TARGET_DIR", dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(!dir.path().join("image.tar").exists());
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = dir.path().join("nothing");
    let err = refused(&[("IMAGE_BINARY", missing.to_str().unwrap())]);
    assert!(err.contains("is not an executable file"), "{err}");
    let err = refused(&[("IMAGE_PROFILE", "debug")]);
    assert!(
        err.contains("IMAGE_PROFILE=debug") && err.contains("does not exist"),
        "{err}"
    );
    let err = refused(&[("IMAGE_PROFILE", "fast")]);
    assert!(err.contains("neither release nor debug"), "{err}");
    let err = refused(&[
        ("IMAGE_BINARY", env!("CARGO_BIN_EXE_shipinator")),
        ("IMAGE_TAG", "a/b"),
    ]);
    assert!(err.contains("IMAGE_TAG 'a/b' is not a tag"), "{err}");
}

/// The deploy stage's artifact: deploy/'s server objects with the image's digest reference.
#[test]
fn the_rendered_manifests_name_the_built_image_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    // Any binary makes an archive to render from; a small one keeps the test quick.
    let true_binary = which("true");
    let digest = build_image(&true_binary, &archive);
    let rendered = dir.path().join("manifests/shipinator.k8s.yaml");
    let render = |repository: &str| {
        Command::new("bash")
            .arg(repository_root().join("scripts/k8s-manifest.sh"))
            .arg(&archive)
            .arg(&rendered)
            .env("IMAGE_REPOSITORY", repository)
            .output()
            .unwrap()
    };
    let out = render("registry.example:5000/ci/shipinator");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&rendered).unwrap();
    let objects: Vec<serde_json::Value> = text
        .split("\n---\n")
        .map(|doc| doc.trim_start_matches("---\n"))
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| serde_saphyr::from_str(doc).unwrap())
        .collect();
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ConfigMap", "Deployment", "Service"]);
    for o in &objects {
        assert_eq!(o["metadata"]["namespace"], "shipinator", "{o}");
    }
    let containers = objects[1]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(
        containers[0]["image"],
        format!("registry.example:5000/ci/shipinator@{digest}")
    );

    let out = render("registry.example/shipinator:v1");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a repository"));
}

/// The repository's pipeline builds the image and the manifests and deploys them.
#[test]
fn the_repositorys_pipeline_deploys_its_own_image() {
    let text = std::fs::read_to_string(repository_root().join(".shipinator.yaml")).unwrap();
    let spec = shipinator_core::config::parse(".shipinator.yaml", &text).unwrap();
    let deploy = spec.deploy.as_ref().expect("a deploy stage");
    assert_eq!(deploy.target, "local");
    assert_eq!(
        deploy.artifact,
        shipinator_core::config::ArtifactSelector::Output("server-manifests".to_owned())
    );
    let outputs: Vec<(String, Option<String>)> = spec
        .build
        .iter()
        .flat_map(|s| &s.steps)
        .flat_map(|s| &s.outputs)
        .map(|o| (o.artifact_type.to_string(), o.name.clone()))
        .collect();
    assert!(outputs.contains(&("oci_image".to_owned(), Some("server-image".to_owned()))));
    assert!(outputs.contains(&(
        "k8s_manifest".to_owned(),
        Some("server-manifests".to_owned())
    )));
}
