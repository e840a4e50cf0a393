//! Collecting a step's declared outputs into the artifact store.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use shipinator_core::artifact::{ArtifactError, ArtifactMeta, ArtifactStore, ByteStream};
use shipinator_core::domain::{ArtifactId, ArtifactType};
use shipinator_core::executor::{ExecutionSpec, OutputDecl, ProducedArtifact};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::error::{Error, safe_join};
use crate::worker::log::LogSink;
use crate::worker::workspace::FILE_MODE_KEY;

/// The largest test report parsed for counts.
const MAX_REPORT: u64 = 64 * 1024 * 1024;

/// The id under which output `index` of an execution is stored: deterministic, so collecting
/// twice never stores twice.
pub fn output_artifact_id(spec: &ExecutionSpec, index: usize) -> ArtifactId {
    ArtifactId::from_uuid(Uuid::new_v5(
        spec.execution_id.as_uuid(),
        format!("output:{index}").as_bytes(),
    ))
}

/// Which outputs to collect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// After a successful command: every declared output; a missing one is an error.
    All,
    /// After a failed command: only test reports and coverage files that exist (failed tests
    /// are exactly when the report matters).
    ReportsOnly,
}

/// Stores the step's declared outputs through `store`.
///
/// # Errors
/// A declared output is missing (with [`Collect::All`]) or invalid, or the store fails.
pub async fn collect_outputs(
    spec: &ExecutionSpec,
    workspace: &Path,
    store: &dyn ArtifactStore,
    which: Collect,
    log: &mut LogSink,
) -> Result<Vec<ProducedArtifact>, Error> {
    let mut produced = Vec::with_capacity(spec.outputs.len());
    for (index, decl) in spec.outputs.iter().enumerate() {
        if which == Collect::ReportsOnly
            && !matches!(
                decl.artifact_type,
                ArtifactType::TestReport | ArtifactType::Coverage
            )
        {
            continue;
        }
        let id = output_artifact_id(spec, index);
        let artifact = match &decl.path {
            Some(rel) => {
                let path = resolve(workspace, rel)?;
                if !path.exists() {
                    if which == Collect::ReportsOnly {
                        continue;
                    }
                    return Err(Error::OutputMissing {
                        artifact_type: decl.artifact_type.to_string(),
                        path: rel.clone(),
                    });
                }
                collect_file(spec, decl, id, rel, &path, store).await?
            }
            None => reference_only(decl, id)?,
        };
        log.system(format!(
            "collected {} {} ({} bytes)",
            artifact.artifact_type,
            artifact
                .path
                .as_deref()
                .or(artifact.metadata.get("ref").map(String::as_str))
                .unwrap_or(""),
            artifact.size
        ))
        .await;
        produced.push(artifact);
    }
    Ok(produced)
}

/// The output's file, checked to be inside the workspace even through symbolic links.
fn resolve(workspace: &Path, rel: &str) -> Result<PathBuf, Error> {
    let path = safe_join(workspace, rel)?;
    if let (Ok(real), Ok(root)) = (path.canonicalize(), workspace.canonicalize())
        && !real.starts_with(&root)
    {
        return Err(Error::UnsafePath {
            path: rel.to_owned(),
        });
    }
    Ok(path)
}

fn reference_only(decl: &OutputDecl, id: ArtifactId) -> Result<ProducedArtifact, Error> {
    let Some(image_ref) = &decl.image_ref else {
        return Err(Error::OutputInvalid {
            path: decl.name.clone().unwrap_or_default(),
            reason: "an output needs a path (or, for an OCI image, a ref)".to_owned(),
        });
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("ref".to_owned(), image_ref.clone());
    Ok(ProducedArtifact {
        id,
        artifact_type: decl.artifact_type,
        name: decl.name.clone(),
        path: None,
        storage_backend: "none".to_owned(),
        storage_path: image_ref.clone(),
        checksum: None,
        size: 0,
        metadata,
    })
}

async fn collect_file(
    spec: &ExecutionSpec,
    decl: &OutputDecl,
    id: ArtifactId,
    rel: &str,
    path: &Path,
    store: &dyn ArtifactStore,
) -> Result<ProducedArtifact, Error> {
    let meta_fs = std::fs::metadata(path).map_err(|e| Error::io_at("reading", path, e))?;
    if !meta_fs.is_file() {
        return Err(Error::OutputInvalid {
            path: rel.to_owned(),
            reason: "it is not a regular file (archive a directory first)".to_owned(),
        });
    }
    let mut extra = BTreeMap::new();
    extra.insert(
        FILE_MODE_KEY.to_owned(),
        format!("{:o}", meta_fs.permissions().mode() & 0o7777),
    );
    match decl.artifact_type {
        ArtifactType::TestReport => {
            if meta_fs.len() <= MAX_REPORT {
                let text = std::fs::read(path).map_err(|e| Error::io_at("reading", path, e))?;
                if let Some(counts) = parse_junit(&String::from_utf8_lossy(&text)) {
                    extra.extend(counts.to_metadata());
                }
            }
        }
        ArtifactType::OciImage => {
            let digest = oci_manifest_digest(path).map_err(|reason| Error::OutputInvalid {
                path: rel.to_owned(),
                reason,
            })?;
            extra.insert("digest".to_owned(), digest);
            if let Some(image_ref) = &decl.image_ref {
                extra.insert("ref".to_owned(), image_ref.clone());
            }
        }
        ArtifactType::Binary
        | ArtifactType::HelmChart
        | ArtifactType::K8sManifest
        | ArtifactType::Coverage
        | ArtifactType::File => {}
    }
    let meta = ArtifactMeta {
        artifact_type: Some(decl.artifact_type),
        content_type: Some(content_type(decl.artifact_type, rel).to_owned()),
        file_name: Path::new(rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        run_id: Some(spec.run_id),
        pipeline_id: None,
        job_id: Some(spec.job_id),
        step_id: Some(spec.step_id),
        extra: extra.clone(),
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io_at("opening", path, e))?;
    let stored = match store.put(id, meta, file_stream(file)).await {
        Ok(stored) => stored,
        // Collected before (a retried collection): the artifact is immutable and ours.
        Err(ArtifactError::AlreadyExists { .. }) => store
            .head(id)
            .await
            .map_err(|e| Error::artifact(format!("reading back output '{rel}'"), e))?,
        Err(e) => return Err(Error::artifact(format!("storing output '{rel}'"), e)),
    };
    Ok(ProducedArtifact {
        id,
        artifact_type: decl.artifact_type,
        name: decl.name.clone(),
        path: Some(rel.to_owned()),
        storage_backend: stored.backend,
        storage_path: stored.storage_path,
        checksum: Some(stored.checksum),
        size: stored.size,
        metadata: extra,
    })
}

fn file_stream(file: tokio::fs::File) -> ByteStream {
    Box::pin(futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match file.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), file)),
            Err(e) => Some((Err(e), file)),
        }
    }))
}

fn content_type(ty: ArtifactType, rel: &str) -> &'static str {
    match ty {
        ArtifactType::OciImage => "application/vnd.oci.image.layout.v1+tar",
        ArtifactType::HelmChart => "application/gzip",
        ArtifactType::K8sManifest => "application/yaml",
        ArtifactType::TestReport if rel.ends_with(".xml") => "application/xml",
        ArtifactType::Coverage | ArtifactType::TestReport => "text/plain",
        ArtifactType::Binary | ArtifactType::File => "application/octet-stream",
    }
}

/// Test counts from a JUnit XML report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestCounts {
    /// Test cases.
    pub tests: u64,
    /// Passed.
    pub passed: u64,
    /// Failed (`<failure>` or `<error>`).
    pub failed: u64,
    /// Skipped.
    pub skipped: u64,
}

impl TestCounts {
    /// As artifact metadata: `tests`, `passed`, `failed`, `skipped`, `format=junit`.
    pub fn to_metadata(self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("format".to_owned(), "junit".to_owned()),
            ("tests".to_owned(), self.tests.to_string()),
            ("passed".to_owned(), self.passed.to_string()),
            ("failed".to_owned(), self.failed.to_string()),
            ("skipped".to_owned(), self.skipped.to_string()),
        ])
    }
}

/// Counts the `<testcase>` elements of a JUnit XML report; `None` if it is not well-formed
/// XML with at least one `<testsuite>` or `<testcase>`.
pub fn parse_junit(xml: &str) -> Option<TestCounts> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut counts = TestCounts::default();
    let mut seen_junit = false;
    // The outcome of the test case being read: 0 passed, 1 failed, 2 skipped.
    let mut in_case: Option<u8> = None;
    loop {
        let (name, empty) = match reader.read_event().ok()? {
            Event::Start(e) => (e.local_name().as_ref().to_owned(), false),
            Event::Empty(e) => (e.local_name().as_ref().to_owned(), true),
            Event::End(e) => {
                if e.local_name().as_ref() == "testcase" {
                    finish_case(&mut counts, &mut in_case);
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        match name.as_str() {
            "testcase" => {
                seen_junit = true;
                finish_case(&mut counts, &mut in_case);
                counts.tests += 1;
                in_case = Some(0);
                if empty {
                    finish_case(&mut counts, &mut in_case);
                }
            }
            "testsuite" | "testsuites" => seen_junit = true,
            "failure" | "error" => {
                if let Some(o) = in_case.as_mut() {
                    *o = 1;
                }
            }
            "skipped" => {
                if let Some(o) = in_case.as_mut()
                    && *o == 0
                {
                    *o = 2;
                }
            }
            _ => {}
        }
    }
    finish_case(&mut counts, &mut in_case);
    seen_junit.then_some(counts)
}

fn finish_case(counts: &mut TestCounts, in_case: &mut Option<u8>) {
    match in_case.take() {
        Some(1) => counts.failed += 1,
        Some(2) => counts.skipped += 1,
        Some(_) => counts.passed += 1,
        None => {}
    }
}

/// The manifest digest recorded in an OCI archive's `index.json`.
pub fn oci_manifest_digest(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("not a tar archive: {e}"))?;
        let is_index = entry
            .path()
            .map(|p| p == Path::new("index.json") || p == Path::new("./index.json"))
            .unwrap_or(false);
        if !is_index {
            continue;
        }
        let mut text = String::new();
        entry
            .by_ref()
            .take(16 * 1024 * 1024)
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read index.json: {e}"))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("index.json is not JSON: {e}"))?;
        return index
            .get("manifests")
            .and_then(|m| m.get(0))
            .and_then(|m| m.get("digest"))
            .and_then(|d| d.as_str())
            .map(str::to_owned)
            .ok_or_else(|| "index.json lists no manifest digest".to_owned());
    }
    Err("not an OCI archive: it has no index.json".to_owned())
}
