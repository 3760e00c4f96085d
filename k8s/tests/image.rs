//! The container image deploy/daemonset.yaml runs: `scripts/build-image`
//! builds it with buildah (debug binaries, into a storage directory of the
//! test's own), and every container of the DaemonSet runs from it, with
//! buildah's chroot isolation (no container engine here): the binaries start
//! (their libraries are all in the image), and the install-cni init
//! container's own command puts a working `nsm-cni` and the ConfigMap's
//! conflist into the "host" directories mounted where the DaemonSet mounts
//! them. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Container;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ok(what: &str, out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: {:?}\n{text}", out.status);
    text
}

/// buildah on the test's storage.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"));
        c
    }

    /// Runs `argv` in a fresh container of `image` with `volumes` (host, path).
    fn run(&self, image: &str, argv: &[String], volumes: &[(PathBuf, String)]) -> Output {
        let ctr = ok(
            "buildah from",
            &self.cmd().args(["from", "-q", image]).output().unwrap(),
        )
        .trim()
        .to_string();
        let mut c = self.cmd();
        c.args(["run", "--isolation", "chroot"]);
        for (host, path) in volumes {
            c.arg("--volume").arg(format!("{}:{path}", host.display()));
        }
        let out = c.arg(&ctr).arg("--").args(argv).output().unwrap();
        let _ = self.cmd().args(["rm", &ctr]).output();
        out
    }
}

#[test]
fn every_daemonset_container_runs_from_the_built_image() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds and runs an image: run it as root"
    );
    let b = Buildah {
        dir: tempfile::tempdir().unwrap(),
    };
    let archive = b.dir.path().join("nsm-rs.oci.tar");
    let out = Command::new(repo().join("scripts/build-image"))
        .args(["--profile", "debug", "--root"])
        .arg(b.dir.path())
        .arg("--oci-archive")
        .arg(&archive)
        .output()
        .unwrap();
    ok("scripts/build-image", &out);

    // The OCI archive holds the image, for importing into a node's runtime.
    let listing = ok(
        "tar",
        &Command::new("tar")
            .arg("tf")
            .arg(&archive)
            .output()
            .unwrap(),
    );
    assert!(listing.lines().any(|l| l == "index.json"), "{listing}");

    // The DaemonSet and its ConfigMaps, as applied.
    let (maps, spec) = nsm_k8s::testing::daemonset_manifest();
    let image = format!("nsm-rs:{}", env!("CARGO_PKG_VERSION"));
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    assert_eq!(all.len(), 3);
    for c in &all {
        assert_eq!(c.image.as_deref(), Some(image.as_str()), "{}", c.name);
    }

    // The long-running containers' programs start: `--help` needs every
    // library the binary links.
    for c in &spec.containers {
        let mut argv = c.command.clone().unwrap();
        argv.push("--help".into());
        let out = b.run(&image, &argv, &[]);
        let text = ok(&format!("{} --help in the image", c.name), &out);
        assert!(text.contains("Usage"), "{text}");
    }
    let out = b.run(
        &image,
        &["/usr/local/bin/nsmctl".into(), "--help".into()],
        &[],
    );
    ok("nsmctl --help in the image", &out);

    // install-cni, with its volumes: the node's CNI directories (empty
    // here) and the ConfigMap.
    let init = &spec.init_containers.as_ref().unwrap()[0];
    let volumes = spec.volumes.as_ref().unwrap();
    let mut mounts = Vec::new();
    for m in init.volume_mounts.as_ref().unwrap() {
        let host = b.dir.path().join(format!("vol-{}", m.name));
        std::fs::create_dir_all(&host).unwrap();
        let vol = volumes.iter().find(|v| v.name == m.name).unwrap();
        if let Some(cm) = &vol.config_map {
            for (k, v) in maps[&cm.name].data.as_ref().unwrap() {
                std::fs::write(host.join(k), v).unwrap();
            }
        }
        mounts.push((host, m.mount_path.clone()));
    }
    let mut argv = init.command.clone().unwrap();
    argv.extend(init.args.clone().unwrap_or_default());
    ok("install-cni in the image", &b.run(&image, &argv, &mounts));
    let host = |name: &str| b.dir.path().join(format!("vol-{name}"));
    let conflist = std::fs::read_to_string(host("cni-conf").join("10-nsm.conflist")).unwrap();
    assert_eq!(
        conflist,
        maps["nsm-cni-config"].data.as_ref().unwrap()["10-nsm.conflist"]
    );
    // The installed plugin runs on the "node" and speaks CNI.
    let out = Command::new(host("cni-bin").join("nsm-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let version: serde_json::Value = serde_json::from_str(&ok("nsm-cni VERSION", &out)).unwrap();
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "1.0.0"),
        "{version}"
    );
    // No temporary file left behind by the copy-then-rename.
    for d in ["cni-bin", "cni-conf"] {
        for e in std::fs::read_dir(host(d)).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "{name:?} left in {d}"
            );
        }
    }
}
