//! Generates the Rust code the SDK commits, from the repository's protos,
//! with protox (a pure-Rust protobuf compiler) and tonic-prost-build: no
//! system `protoc` is needed. `cargo run -p codegen` writes the files; the
//! `fresh` test (run by `cargo test --workspace`) fails when they are stale.

use std::path::{Path, PathBuf};

/// One generation job: protos compiled into one output directory.
struct Job {
    protos: &'static [&'static str],
    includes: &'static [&'static str],
    out_dir: &'static str,
    server: bool,
    client: bool,
}

/// Paths are relative to the repository root.
const JOBS: &[Job] = &[
    Job {
        protos: &["pluginframework/v1/tunnel.proto"],
        includes: &["proto"],
        out_dir: "sdk/rust/opf/src/gen",
        server: false,
        client: true,
    },
    Job {
        protos: &["conformance/v1/conformance.proto"],
        includes: &["proto"],
        out_dir: "sdk/rust/conformance/src/gen",
        server: true,
        client: true,
    },
    Job {
        protos: &["demo/v1/demo.proto"],
        includes: &["examples/proto"],
        out_dir: "sdk/rust/examples/validator/src/gen",
        server: true,
        client: true,
    },
];

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..").canonicalize().expect("the repository root exists")
}

/// Generates every job into a scratch directory, then either copies the
/// files into place or, with `check`, lists those that differ.
pub fn run(root: &Path, check: bool) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = std::env::temp_dir().join(format!("opf-codegen-{}-{n}", std::process::id()));
    let mut stale = Vec::new();
    for (i, job) in JOBS.iter().enumerate() {
        let tmp = scratch.join(i.to_string());
        std::fs::create_dir_all(&tmp)?;
        let includes: Vec<PathBuf> = job.includes.iter().map(|p| root.join(p)).collect();
        let fds = protox::compile(job.protos, &includes)?;
        tonic_prost_build::configure()
            .build_server(job.server)
            .build_client(job.client)
            .build_transport(false)
            .bytes(".")
            .out_dir(&tmp)
            .compile_fds(fds)?;
        let out_dir = root.join(job.out_dir);
        let mut names: Vec<_> = std::fs::read_dir(&tmp)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let generated = std::fs::read(tmp.join(&name))?;
            let dest = out_dir.join(&name);
            let current = std::fs::read(&dest).ok();
            if current.as_deref() == Some(&generated[..]) {
                continue;
            }
            if check {
                stale.push(dest);
            } else {
                std::fs::create_dir_all(&out_dir)?;
                std::fs::write(&dest, generated)?;
                println!("wrote {}", dest.display());
            }
        }
    }
    std::fs::remove_dir_all(&scratch)?;
    Ok(stale)
}
