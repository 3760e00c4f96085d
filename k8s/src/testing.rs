//! A real Kubernetes API server for tests: etcd and kube-apiserver on
//! loopback, with a static admin token and a kubeconfig file, removed on drop.
//!
//! No kubelet runs: Pods stay Pending, which is all the mesh needs (it reads
//! pods scheduled to a node and their annotations, and attaches their
//! namespaces itself through the CNI plugin).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/ensure-kube-apiserver` caches the binary.
pub const DEFAULT_APISERVER: &str = "/var/cache/nsm-rs/bin/kube-apiserver";
/// How long the API server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the API server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A binary is missing.
    #[error(
        "{0} not found: run scripts/ensure-kube-apiserver (it builds kube-apiserver and installs etcd)"
    )]
    Missing(String),
    /// Starting a process or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// It never became ready.
    #[error("kube-apiserver not ready after {0:?}; its log: {1}")]
    NotReady(Duration, String),
}

/// A running etcd + kube-apiserver pair. Dropping it stops both and removes
/// their data.
#[derive(Debug)]
pub struct ApiServer {
    dir: tempfile::TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    apiserver_bin: PathBuf,
    port: u16,
    token: String,
}

fn free_port() -> Result<u16, HarnessError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| HarnessError::Io {
            what: "pick a loopback port".into(),
            source,
        })
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        what: what.to_string(),
        source,
    }
}

impl ApiServer {
    /// Starts etcd and kube-apiserver (`$NSM_KUBE_APISERVER` or the cached
    /// build) and returns when `/readyz` answers ok. Loopback ports are
    /// picked free and then bound by the child processes; a port another
    /// test took in between ("address already in use") costs a new attempt
    /// with new ports, up to three.
    pub fn start() -> Result<Self, HarnessError> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Err(HarnessError::NotReady(_, log))
                    if attempt < 3 && log.contains("address already in use") =>
                {
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn start_once() -> Result<Self, HarnessError> {
        let apiserver_bin = std::env::var_os("NSM_KUBE_APISERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_APISERVER));
        if !apiserver_bin.exists() {
            return Err(HarnessError::Missing(apiserver_bin.display().to_string()));
        }
        if !Path::new("/usr/bin/etcd").exists() {
            return Err(HarnessError::Missing("/usr/bin/etcd".into()));
        }
        let dir = tempfile::Builder::new()
            .prefix("nsm-apiserver-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let (client_port, peer_port, port) = (free_port()?, free_port()?, free_port()?);
        let etcd_log =
            std::fs::File::create(dir.path().join("etcd.log")).map_err(io("etcd log"))?;
        let etcd = Command::new("/usr/bin/etcd")
            .args(["--data-dir", &dir.path().join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(etcd_log)
            .spawn()
            .map_err(io("start etcd"))?;
        let token = format!("nsm-test-{}-{port}", std::process::id());
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )
        .map_err(io("token file"))?;
        let key = dir.path().join("sa.key");
        let status = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .map_err(io("openssl genrsa (service account key)"))?;
        if !status.success() {
            return Err(HarnessError::Missing("openssl".into()));
        }
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers=http://127.0.0.1:{client_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", dir.path().join("certs").display()),
            format!(
                "--token-auth-file={}",
                dir.path().join("tokens.csv").display()
            ),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
        ];
        let mut server = ApiServer {
            dir,
            etcd: Some(etcd),
            apiserver: None,
            apiserver_args,
            apiserver_bin,
            port,
            token,
        };
        server.write_kubeconfig()?;
        server.resume()?;
        Ok(server)
    }

    /// Stops the API server (etcd keeps the data), as an outage would.
    pub fn pause(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again (after [`ApiServer::pause`]) and waits until it is ready.
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        let log_path = self.dir.path().join("apiserver.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("apiserver log"))?;
        let child = Command::new(&self.apiserver_bin)
            .args(&self.apiserver_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("start kube-apiserver"))?;
        self.apiserver = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if self.ready() {
                return Ok(());
            }
            // One that exited (a port taken, a bad flag) will not get ready.
            if self
                .apiserver
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        Err(HarnessError::NotReady(READY_TIMEOUT, tail))
    }

    /// Whether `/readyz` answers ok (plain HTTPS with the admin token, via curl
    /// so the harness needs no second TLS stack).
    fn ready(&self) -> bool {
        Command::new("curl")
            .args([
                "-skf",
                "-m",
                "2",
                "-H",
                &format!("Authorization: Bearer {}", self.token),
            ])
            .arg(format!("{}/readyz", self.url()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn write_kubeconfig(&self) -> Result<(), HarnessError> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
             current-context: test\n",
            self.url(),
            self.token
        );
        std::fs::write(self.kubeconfig(), text).map_err(io("kubeconfig"))
    }

    /// The certificate bundle the API server serves (its self-signed
    /// certificate and the CA that signed it), what a pod's service account
    /// `ca.crt` holds.
    pub fn ca_bundle(&self) -> PathBuf {
        self.dir.path().join("certs").join("apiserver.crt")
    }

    /// The API server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The API server's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig file for the admin user (for `--kubeconfig` and kubectl).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A client for the admin user.
    pub async fn client(&self) -> Result<kube::Client, Box<dyn std::error::Error + Send + Sync>> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.pause();
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }
}

/// `deploy/daemonset.yaml` as the API server would take it: its ConfigMaps
/// by name, and the pod spec of its DaemonSet (for tests that run its
/// containers as a kubelet would).
///
/// # Panics
/// The file is missing or does not hold those objects (a broken manifest
/// must fail the test that reads it).
pub fn daemonset_manifest() -> (
    std::collections::BTreeMap<String, k8s_openapi::api::core::v1::ConfigMap>,
    k8s_openapi::api::core::v1::PodSpec,
) {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use k8s_openapi::api::core::v1::ConfigMap;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/daemonset.yaml");
    let mut maps = std::collections::BTreeMap::new();
    let mut ds = None;
    for doc in text.split("\n---\n") {
        let v: serde_json::Value = serde_norway::from_str(doc).expect("a YAML document");
        match v["kind"].as_str() {
            Some("ConfigMap") => {
                let cm: ConfigMap = serde_json::from_value(v).expect("a ConfigMap");
                maps.insert(cm.metadata.name.clone().unwrap_or_default(), cm);
            }
            Some("DaemonSet") => {
                ds = Some(serde_json::from_value::<DaemonSet>(v).expect("a DaemonSet"))
            }
            _ => {}
        }
    }
    let spec = ds
        .and_then(|d| d.spec)
        .and_then(|s| s.template.spec)
        .expect("a DaemonSet with a pod template");
    (maps, spec)
}
