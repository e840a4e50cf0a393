//! The benchmark's measuring code runs end to end on a small payload.

use shipinator_nfs::bench;

#[tokio::test]
async fn bench_measures_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let report = bench::artifacts(dir.path(), 3 * 1024 * 1024 + 1)
        .await
        .unwrap();
    assert_eq!(report.size_bytes, 3 * 1024 * 1024 + 1);
    assert!(report.upload_mb_s > 0.0 && report.download_mb_s > 0.0);
    assert!(report.peak_rss_bytes.is_some_and(|b| b > 0));
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["bench"], "artifacts");
    assert_eq!(json["size_bytes"], 3 * 1024 * 1024 + 1);
    assert!(json["upload_mb_s"].as_f64().is_some());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing is left behind"
    );
}
