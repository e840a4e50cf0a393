//! `shipinator bench artifacts --path DIR --size 1GiB`: upload and download throughput of the
//! filesystem artifact store on a volume, and the process's peak RSS, as one JSON line.

use super::ArtifactsArgs;
use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

pub(crate) fn run(args: &ArtifactsArgs) -> u8 {
    let size = match shipinator_nfs::bench::parse_size(&args.size) {
        Ok(size) => size,
        Err(e) => {
            eprintln!("bench artifacts: {e}");
            return EXIT_USAGE;
        }
    };
    if !args.path.is_dir() {
        eprintln!(
            "bench artifacts: {} is not a directory; pass --path with a directory on the volume to measure",
            args.path.display()
        );
        return EXIT_USAGE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench artifacts: cannot start the runtime: {e}");
            return EXIT_FAILED;
        }
    };
    match runtime.block_on(shipinator_nfs::bench::artifacts(&args.path, size)) {
        Ok(report) => {
            println!("{}", report.to_json());
            EXIT_OK
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("bench artifacts: {message}");
            EXIT_FAILED
        }
    }
}
