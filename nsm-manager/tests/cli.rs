//! The three binaries' command lines: flags the testbed relies on, the
//! config error contract (one line, exit 2), and nsmctl against a live
//! in-process manager.

use std::process::Command;
use std::time::Duration;

use nsm_manager::config::Config;
use nsm_manager::server::{Options, start};

const MANAGER: &str = env!("CARGO_BIN_EXE_nsm-manager");
const NSMCTL: &str = env!("CARGO_BIN_EXE_nsmctl");
const ENDPOINT: &str = env!("CARGO_BIN_EXE_nsm-endpoint");

#[test]
fn help_documents_every_flag() {
    let out = Command::new(MANAGER).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--name",
        "--listen",
        "--peer-listen",
        "--advertise-url",
        "--forwarder",
        "--state-dir",
        "--registry",
        "--config",
        "--max-token-lifetime",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    for (bin, flags) in [
        (
            ENDPOINT,
            &["--name", "--service", "--labels", "--manager", "--listen"][..],
        ),
        (NSMCTL, &["--manager", "request", "close", "get"][..]),
    ] {
        let out = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        for f in flags {
            assert!(help.contains(f), "{bin}: {f} missing from --help");
        }
    }
}

#[test]
fn bad_config_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "services:\n- name: a\n  cidr: 10.0.0.0/24\n  bogus: 1\n",
    )
    .unwrap();
    let out = Command::new(MANAGER)
        .args(["--name", "n", "--config"])
        .arg(&cfg)
        .arg("--listen")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("st"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.yaml") && err.contains("bogus"), "{err}");
    assert!(!dir.path().join("s.sock").exists(), "nothing is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nsmctl_lists_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nsm.sock");
    let h = start(Options {
        name: "node-1".into(),
        listen: sock.clone(),
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: None,
        forwarder: dir.path().join("fwd.sock"),
        state_dir: Some(dir.path().join("state")),
        registry: None,
        config: Config::parse(
            "services:\n- name: secure-net\n  cidr: 172.31.0.0/24\n",
            "t",
        )
        .unwrap(),
        max_token_lifetime: Duration::from_secs(600),
        cluster: None,
        security: Default::default(),
    })
    .await
    .unwrap();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(NSMCTL).args(args).output().unwrap())
    };
    let m = sock.display().to_string();
    let out = run(vec![
        "--manager".into(),
        m.clone(),
        "get".into(),
        "services".into(),
        "--json".into(),
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["name"], "secure-net");
    assert_eq!(v["payload"], "IP");

    let out = run(vec![
        "--manager".into(),
        m.clone(),
        "request".into(),
        "nope".into(),
        "--netns".into(),
        "/proc/self/ns/net".into(),
    ])
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("`nope` is not registered") && err.contains("NotFound"),
        "{err}"
    );

    let out = run(vec![
        "--manager".into(),
        m,
        "get".into(),
        "connections".into(),
    ])
    .await
    .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("ID"));
    h.shutdown().await;
}
