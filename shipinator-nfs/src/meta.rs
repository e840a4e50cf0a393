//! `metadata.json`: the copy of an artifact's metadata kept beside its payload, shared by the
//! filesystem and S3 stores, and the sanitising of user-supplied file names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shipinator_core::artifact::{ArtifactMeta, StoredArtifact};
use shipinator_core::domain::{ArtifactId, ArtifactType, JobId, PipelineId, RunId, StepId};
use shipinator_core::time::Timestamp;

/// The longest file name kept, in bytes (the usual `NAME_MAX`).
pub const MAX_FILE_NAME: usize = 255;

/// Keys of [`ArtifactMeta::extra`] that are stored as top-level fields of `metadata.json`.
const IMAGE_REF: &str = "image_ref";
const IMAGE_DIGEST: &str = "image_digest";

/// The on-disk form, version 1.
///
/// ```json
/// {"format":1,"id":"…","type":"binary","size":42,"sha256":"…","content_type":"…",
///  "file_name":"app","run_id":"…","pipeline_id":"…","job_id":"…","step_id":"…",
///  "created_at":"2026-11-23T10:15:00.123456Z","image_ref":null,"image_digest":null,"extra":{}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetadataFile {
    format: u32,
    id: ArtifactId,
    #[serde(rename = "type")]
    artifact_type: Option<ArtifactType>,
    size: u64,
    sha256: String,
    content_type: Option<String>,
    file_name: Option<String>,
    run_id: Option<RunId>,
    pipeline_id: Option<PipelineId>,
    job_id: Option<JobId>,
    step_id: Option<StepId>,
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_digest: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    extra: BTreeMap<String, String>,
}

impl MetadataFile {
    /// The record of a payload just written.
    pub(crate) fn new(
        id: ArtifactId,
        mut meta: ArtifactMeta,
        size: u64,
        sha256_hex: String,
        created_at: Timestamp,
    ) -> Self {
        let image_ref = meta.extra.remove(IMAGE_REF);
        let image_digest = meta.extra.remove(IMAGE_DIGEST);
        Self {
            format: 1,
            id,
            artifact_type: meta.artifact_type,
            size,
            sha256: sha256_hex,
            content_type: meta.content_type,
            file_name: meta.file_name,
            run_id: meta.run_id,
            pipeline_id: meta.pipeline_id,
            job_id: meta.job_id,
            step_id: meta.step_id,
            created_at: created_at.to_rfc3339(),
            image_ref,
            image_digest,
            extra: meta.extra,
        }
    }

    pub(crate) fn id(&self) -> ArtifactId {
        self.id
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn sha256_hex(&self) -> &str {
        &self.sha256
    }

    /// The record as core's type.
    pub(crate) fn to_stored(&self, backend: &str, storage_path: String) -> StoredArtifact {
        let mut extra = self.extra.clone();
        if let Some(r) = &self.image_ref {
            extra.insert(IMAGE_REF.to_owned(), r.clone());
        }
        if let Some(d) = &self.image_digest {
            extra.insert(IMAGE_DIGEST.to_owned(), d.clone());
        }
        StoredArtifact {
            id: self.id,
            backend: backend.to_owned(),
            storage_path,
            size: self.size,
            checksum: format!("sha256:{}", self.sha256),
            created_at: Timestamp::parse_rfc3339(&self.created_at).unwrap_or(Timestamp::EPOCH),
            meta: ArtifactMeta {
                artifact_type: self.artifact_type,
                content_type: self.content_type.clone(),
                file_name: self.file_name.clone(),
                run_id: self.run_id,
                pipeline_id: self.pipeline_id,
                job_id: self.job_id,
                step_id: self.step_id,
                extra,
            },
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Sanitises a user-supplied file name so it is safe to show and to offer as a download name:
/// only the last path component is kept (`/` and `\` both separate), NUL and control
/// characters are dropped, `.` and `..` become nothing, and the result is cut to
/// [`MAX_FILE_NAME`] bytes at a character boundary. `None` when nothing is left.
///
/// The name is only ever stored in `metadata.json`; no path is built from it.
pub fn sanitize_file_name(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return None;
    }
    let mut end = cleaned.len().min(MAX_FILE_NAME);
    while !cleaned.is_char_boundary(end) {
        end -= 1;
    }
    Some(cleaned[..end].to_owned())
}

/// `meta` with its file name sanitised.
pub(crate) fn sanitize_meta(mut meta: ArtifactMeta) -> ArtifactMeta {
    meta.file_name = meta.file_name.as_deref().and_then(sanitize_file_name);
    meta
}

/// Checks a requested range against a payload size: `start <= end <= size`.
pub(crate) fn check_range(
    id: ArtifactId,
    range: Option<shipinator_core::artifact::ByteRange>,
    size: u64,
) -> Result<(u64, u64), crate::Error> {
    let Some(r) = range else {
        return Ok((0, size));
    };
    let end = r.end.unwrap_or(size);
    if r.start > end || end > size {
        return Err(crate::Error::InvalidRange {
            id,
            start: r.start,
            end: r.end,
            size,
        });
    }
    Ok((r.start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitised() {
        assert_eq!(
            sanitize_file_name("app.tar.gz").as_deref(),
            Some("app.tar.gz")
        );
        assert_eq!(
            sanitize_file_name("../../etc/passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(sanitize_file_name("/abs/x").as_deref(), Some("x"));
        assert_eq!(
            sanitize_file_name("..\\..\\win.ini").as_deref(),
            Some("win.ini")
        );
        assert_eq!(sanitize_file_name("a\0b\nc").as_deref(), Some("abc"));
        assert_eq!(sanitize_file_name(".."), None);
        assert_eq!(sanitize_file_name("dir/"), None);
        let long = "é".repeat(300);
        let cut = sanitize_file_name(&long).unwrap();
        assert!(cut.len() <= MAX_FILE_NAME && cut.chars().all(|c| c == 'é'));
    }
}
