//! Keeps the checked-in bindings under `src/gen/` in step with `proto/`.
//!
//! The crate builds without `protoc` because the generated Rust is checked
//! in; this test is what stops it from drifting. It regenerates everything
//! into a temporary directory with the settings in [`generate`] (the only
//! place they live) and compares byte for byte.
//!
//! To refresh `src/gen/` after editing a `.proto` file:
//!
//! ```text
//! NSM_PROTO_BLESS=1 cargo test -p nsm-proto --test bootstrap
//! ```
//!
//! Needs `protoc` with the well-known types (Debian: `protobuf-compiler`
//! and `libprotobuf-dev`), or `PROTOC`/`PROTOC_INCLUDE` pointing at them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The `.proto` files compiled, relative to `proto/` (also the include root,
/// so imports look like NSM's: `import "connection.proto"`).
const PROTOS: &[&str] = &[
    "connectioncontext.proto",
    "connection.proto",
    "networkservice.proto",
    "registry.proto",
    "ipam.proto",
    "nsm/forwarder/v1/forwarder.proto",
    "nsm/manager/v1/pods.proto",
];

const BLESS_VAR: &str = "NSM_PROTO_BLESS";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs tonic-prost-build over [`PROTOS`] into `out_dir`: clients and
/// servers for every service, `google.protobuf.*` mapped to `prost-types`
/// (and `Empty` to `()`), as tonic does by default.
fn generate(out_dir: &Path) -> std::io::Result<()> {
    let root = crate_dir().join("proto");
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_protos(&protos, &[root])
}

/// `*.rs` files of `dir` by file name.
fn rust_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return files,
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|ext| ext == "rs") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("generated file names are UTF-8")
                .to_owned();
            let bytes =
                fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            files.insert(name, bytes);
        }
    }
    files
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    if let Err(e) = generate(tmp.path()) {
        panic!(
            "code generation failed: {e}\n\
             The bootstrap test needs protoc and the protobuf well-known types \
             (Debian: apt-get install protobuf-compiler libprotobuf-dev)."
        );
    }
    let fresh = rust_files(tmp.path());
    assert!(!fresh.is_empty(), "tonic-prost-build produced no files");

    let gen_dir = crate_dir().join("src").join("gen");
    let checked_in = rust_files(&gen_dir);

    if std::env::var_os(BLESS_VAR).is_some_and(|v| v == "1") {
        fs::create_dir_all(&gen_dir).expect("creating src/gen");
        for name in checked_in.keys().filter(|n| !fresh.contains_key(*n)) {
            fs::remove_file(gen_dir.join(name)).expect("removing a stale generated file");
        }
        for (name, bytes) in &fresh {
            fs::write(gen_dir.join(name), bytes).expect("writing a generated file");
        }
        return;
    }

    let mut problems = Vec::new();
    for (name, bytes) in &fresh {
        match checked_in.get(name) {
            None => problems.push(format!("src/gen/{name} is missing")),
            Some(old) if old != bytes => problems.push(format!("src/gen/{name} is out of date")),
            Some(_) => {}
        }
    }
    for name in checked_in.keys().filter(|n| !fresh.contains_key(*n)) {
        problems.push(format!("src/gen/{name} is no longer generated"));
    }
    assert!(
        problems.is_empty(),
        "the checked-in bindings do not match proto/*.proto:\n  {}\n\
         Regenerate them with:\n  {BLESS_VAR}=1 cargo test -p nsm-proto --test bootstrap\n\
         and commit proto/src/gen together with the .proto change.",
        problems.join("\n  ")
    );
}
