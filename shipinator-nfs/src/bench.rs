//! The artifact-store benchmark behind `shipinator bench artifacts`: upload and download
//! throughput of [`NfsArtifactStore`] on a given volume, and the process's peak RSS.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use shipinator_core::artifact::{ArtifactMeta, ArtifactStore, ByteStream, GetOptions};
use shipinator_core::domain::ArtifactId;

use crate::error::Error;
use crate::fs::{CHUNK_SIZE, NfsArtifactStore};

/// What one run measured. Throughputs are in MB/s of 10^6 bytes, like `dd` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The directory measured (a temporary subdirectory of it held the artifact).
    pub path: PathBuf,
    /// Payload size in bytes.
    pub size_bytes: u64,
    /// `put` throughput, streaming 1 MiB chunks, sha256 and fsyncs included.
    pub upload_mb_s: f64,
    /// Seconds the `put` took.
    pub upload_seconds: f64,
    /// `get` throughput reading the whole payload without checksum verification, after the
    /// payload's pages were dropped from the page cache (`POSIX_FADV_DONTNEED`).
    pub download_mb_s: f64,
    /// Seconds the `get` took.
    pub download_seconds: f64,
    /// The process's peak resident set size (`VmHWM`), in bytes, when known.
    pub peak_rss_bytes: Option<u64>,
}

impl BenchReport {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "bench": "artifacts",
            "backend": crate::fs::BACKEND,
            "path": self.path.display().to_string(),
            "size_bytes": self.size_bytes,
            "upload_mb_s": round(self.upload_mb_s),
            "upload_seconds": round(self.upload_seconds),
            "download_mb_s": round(self.download_mb_s),
            "download_seconds": round(self.download_seconds),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_mib": self.peak_rss_bytes.map(|b| round(b as f64 / f64::from(1u32 << 20))),
        })
        .to_string()
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Uploads then downloads one `size`-byte artifact in a fresh subdirectory of `path` with the
/// default store settings (fsync on), then removes it.
///
/// # Errors
/// Any store error, as [`Error`].
pub async fn artifacts(path: &Path, size: u64) -> Result<BenchReport, Error> {
    let dir = path.join(format!(
        ".shipinator-bench-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let result = run(&dir, path, size).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(dir: &Path, path: &Path, size: u64) -> Result<BenchReport, Error> {
    let store = NfsArtifactStore::new(dir)?;
    let id = ArtifactId::new_v7();
    let chunk = Bytes::from(pattern(CHUNK_SIZE));
    let chunks = size.div_ceil(CHUNK_SIZE as u64);
    let body: ByteStream = Box::pin(futures_util::stream::iter((0..chunks).map(move |i| {
        let len = (size - i * CHUNK_SIZE as u64).min(CHUNK_SIZE as u64);
        Ok(chunk.slice(..usize::try_from(len).unwrap_or(CHUNK_SIZE)))
    })));

    let started = Instant::now();
    store
        .put(id, ArtifactMeta::default(), body)
        .await
        .map_err(|e| Error::Config {
            message: format!("upload failed: {}", chain(&e)),
        })?;
    let upload_seconds = started.elapsed().as_secs_f64();

    drop_cached_pages(&store.payload_path(id));
    let started = Instant::now();
    let read = store
        .get(id, GetOptions::default())
        .await
        .map_err(|e| Error::Config {
            message: format!("download failed: {}", chain(&e)),
        })?;
    let mut body = read.body;
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        got += chunk
            .map_err(|e| Error::io("read", store.payload_path(id), e))?
            .len() as u64;
    }
    let download_seconds = started.elapsed().as_secs_f64();
    if got != size {
        return Err(Error::Corrupt {
            id,
            detail: format!("downloaded {got} of {size} bytes"),
        });
    }
    let _ = store.delete(id).await;
    let mb = size as f64 / 1e6;
    Ok(BenchReport {
        path: path.to_path_buf(),
        size_bytes: size,
        upload_mb_s: mb / upload_seconds.max(1e-9),
        upload_seconds,
        download_mb_s: mb / download_seconds.max(1e-9),
        download_seconds,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Asks the kernel to forget a file's cached pages (they are clean after the fsync), so the
/// download reads from the volume.
fn drop_cached_pages(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Incompressible-looking bytes.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// The process's peak resident set size (`VmHWM` in `/proc/self/status`), in bytes; `None`
/// where that file does not exist.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Parses a size such as `1GiB`, `16MiB`, `512k`, `100MB` or `4096`. Binary units: `KiB`,
/// `MiB`, `GiB`, `TiB` and the single letters `k`, `K`, `M`, `G`, `T` (as `dd` reads them);
/// decimal units: `kB`, `KB`, `MB`, `GB`, `TB`.
///
/// # Errors
/// [`Error::Config`] for anything else.
pub fn parse_size(text: &str) -> Result<u64, Error> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::Config {
        message: format!("invalid size '{text}': expected e.g. 16MiB, 1GiB, 100MB or 4096"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn peak_rss_is_read() {
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
