//! Distributed tracing end to end: a cross-node Request is one trace over
//! every hop (the client, both managers, both forwarders, the endpoint),
//! and so is its Close, exported over OTLP/gRPC to a receiver this test
//! runs.
//!
//! # Where the receiver listens
//!
//! The mesh processes run in the lab's network namespaces, so the test
//! process's loopback is out of their reach, and the host's own networks
//! are never used. The receiver therefore listens *inside* node-1's
//! namespace, on node-1's underlay address (from the lab's plan, port
//! 4317): a
//! thread enters that namespace with `setns(CLONE_NEWNET)` (a per-thread
//! attribute) and builds the receiver's tokio runtime there, so its
//! worker threads, created by that thread, are in the namespace too, and
//! so is the socket they bind. node-1's processes reach it locally,
//! node-2's over the underlay, and the endpoint pod on node-2 through its
//! node, which routes the underlay (the lab enables forwarding).
//!
//! The test itself is the client (`nsm_testbed::mesh::request`, whose
//! span is `nsm.client/Request`). Its own exporter is built the same way,
//! by a thread inside node-1's namespace, so its span travels over the
//! same real OTLP path as everyone else's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nsm_testbed::lab::{Lab, Options};
use nsm_testbed::mesh::{self, RequestedConnection};
use nsm_testbed::testing::{require_root, unique_lab_name};
use nsm_testbed::{Topology, sys};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};

const TIMEOUT: Duration = Duration::from_secs(20);
/// OTLP/gRPC's registered port.
const OTLP_PORT: u16 = 4317;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: BTreeMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// The OTLP TraceService: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        r: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in r.into_inner().resource_spans {
            let res = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            let service = res.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Runs `f` on a new thread that has entered network namespace `netns`;
/// threads `f` creates (tokio workers) are in it too.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Path::new(sys::NETNS_DIR).join(netns);
    std::thread::spawn(move || {
        let fd =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns into the node's namespace");
        f()
    })
    .join()
    .expect("the namespace thread does not panic")
}

/// Starts the receiver on `addr` inside `netns`; the runtime keeps serving
/// until it is dropped.
fn start_receiver(
    netns: &str,
    addr: std::net::SocketAddr,
) -> (tokio::runtime::Runtime, Arc<Mutex<Vec<Got>>>) {
    let receiver = Receiver::default();
    let spans = receiver.spans.clone();
    let rt = in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind the OTLP receiver on {addr}: {e}"));
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        rt
    });
    (rt, spans)
}

fn topology(name: &str) -> String {
    format!(
        r#"
name: {name}
nodes: [{{name: node-1}}, {{name: node-2}}]
services:
  - {{name: secure-net, cidr: 172.31.0.0/16}}
endpoints:
  - {{name: echo, node: node-2, service: secure-net, labels: {{app: echo}}}}
  - {{name: insp-1, node: node-1, service: inspector, passthrough: true}}
pods:
  - {{name: web, node: node-1}}
policies:
  - name: inspect
    match: {{service: secure-net, source: {{app: chained}}}}
    chain:
      - endpoint: {{service: inspector}}
"#
    )
}

/// The spans of `trace_id` so far.
fn trace(spans: &Mutex<Vec<Got>>, trace_id: &str) -> Vec<Got> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .cloned()
        .collect()
}

/// Waits until `want` (service, span name) pairs all appear in the trace.
fn wait_for(spans: &Mutex<Vec<Got>>, trace_id: &str, want: &[(&str, &str)]) -> Vec<Got> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = trace(spans, trace_id);
        let missing: Vec<_> = want
            .iter()
            .filter(|(svc, name)| !got.iter().any(|s| s.service == *svc && s.name == *name))
            .collect();
        if missing.is_empty() {
            return got;
        }
        if Instant::now() >= deadline {
            let all = spans.lock().unwrap().clone();
            panic!(
                "trace {trace_id}: missing {missing:?} after {TIMEOUT:?}\nin the trace: {got:#?}\nall spans received: {all:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
        .unwrap_or_else(|| panic!("no {name} from {service} in {spans:#?}"))
}

#[test]
fn a_cross_node_request_is_one_trace_over_every_hop() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_lab_name("trace");
    let topo = Topology::parse(&topology(&name)).expect("valid topology");
    // The receiver's address is node-1's underlay address, known before
    // the lab exists; the exporters connect lazily, so it may start after
    // the mesh (nothing is requested before it listens).
    let node1_ip = topo.plan().nodes[0].underlay_ip;
    let addr = std::net::SocketAddr::from((node1_ip, OTLP_PORT));
    let endpoint = format!("http://{addr}");
    let env = [
        (nsm_trace::ENDPOINT_ENV.to_string(), endpoint.clone()),
        // Export within 200 ms instead of 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "200".to_string()),
    ];
    let lab = Lab::up_with_env(
        topo,
        &Options {
            state_root: dir.path().to_path_buf(),
            ..Options::default()
        },
        &env,
    )
    .expect("lab comes up with its mesh");
    assert!(
        lab.missing_binaries().is_empty(),
        "mesh binaries not built: {:?} (the test command builds them first)",
        lab.missing_binaries()
    );
    let node1_ns = lab.netns("node-1").unwrap();
    let (_receiver, spans) = start_receiver(&node1_ns, addr);

    // The test's own exporter (the client's), built inside node-1 too.
    let cfg = nsm_trace::TraceConfig {
        endpoint: Some(endpoint),
        service_name: "trace-test".into(),
        node: "test".into(),
    };
    let telemetry = in_netns(&node1_ns, move || {
        nsm_trace::init(&cfg).expect("subscriber")
    });

    let web_ns = PathBuf::from(sys::NETNS_DIR).join(lab.netns("web").unwrap());
    let req = RequestedConnection {
        id: format!("{}-web-nsm0", lab.name()),
        pod: "web".into(),
        node: "node-1".into(),
        interface: "nsm0".into(),
        service: "secure-net".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
    };
    let conn = mesh::request(&lab.manager_socket("node-1"), &web_ns, &req, false, TIMEOUT)
        .expect("the cross-node request succeeds");
    telemetry.flush();

    // The client span is the trace's root; find its trace id.
    let client = {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let found = spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.service == "trace-test" && s.name == "nsm.client/Request")
                .cloned();
            if let Some(c) = found {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the client's span never reached the receiver"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(client.parent, "", "the client span is the root");
    let hops = [
        ("nsm-manager@node-1", "nsm.manager/Request"),
        ("nsm-manager@node-2", "nsm.manager/Request"),
        ("nsm-forwarder@node-1", "nsm.forwarder/Program"),
        ("nsm-forwarder@node-2", "nsm.forwarder/Program"),
        ("nsm-endpoint@echo", "nsm.endpoint/Request"),
    ];
    let got = wait_for(&spans, &client.trace_id, &hops);
    for s in &got {
        eprintln!(
            "trace {}: {} {} <- {} [{}]",
            s.trace_id, s.span_id, s.name, s.parent, s.service
        );
    }

    // Parents follow the calls: client -> manager-1 -> {forwarder-1,
    // manager-2} and manager-2 -> {forwarder-2, echo}.
    let m1 = one(&got, "nsm-manager@node-1", "nsm.manager/Request");
    let m2 = one(&got, "nsm-manager@node-2", "nsm.manager/Request");
    let ep = one(&got, "nsm-endpoint@echo", "nsm.endpoint/Request");
    assert_eq!(m1.parent, client.span_id, "manager-1 is the client's child");
    assert_eq!(m2.parent, m1.span_id, "manager-2 is manager-1's child");
    assert_eq!(ep.parent, m2.span_id, "the endpoint is manager-2's child");
    for (svc, parent) in [("nsm-forwarder@node-1", m1), ("nsm-forwarder@node-2", m2)] {
        assert!(
            got.iter().any(|s| s.service == svc
                && s.name == "nsm.forwarder/Program"
                && s.parent == parent.span_id),
            "{svc}'s Program is a child of its manager's Request: {got:#?}"
        );
    }

    // Attributes: connection id, service, endpoint, node, outcome.
    assert_eq!(m1.attrs["nsm.connection.id"], conn.id);
    for s in [m1, m2, ep] {
        assert_eq!(s.attrs["nsm.network_service"], "secure-net", "{s:?}");
        assert_eq!(s.attrs["nsm.outcome"], "ok", "{s:?}");
    }
    assert_eq!(m1.attrs["nsm.endpoint"], "echo");
    assert_eq!(m1.attrs["nsm.node"], "node-1");
    assert_eq!(m2.attrs["nsm.node"], "node-2");
    assert_eq!(ep.attrs["nsm.endpoint"], "echo");
    assert_eq!(client.attrs["nsm.outcome"], "ok");
    let fwd = one(&got, "nsm-forwarder@node-1", "nsm.forwarder/Program");
    assert!(!fwd.attrs["nsm.connection.id"].is_empty(), "{fwd:?}");

    // The Close is its own trace over the same hops.
    mesh::close(&lab.manager_socket("node-1"), &conn, TIMEOUT).expect("close");
    telemetry.flush();
    let close_id = {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let found = spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.service == "trace-test" && s.name == "nsm.client/Close")
                .map(|s| s.trace_id.clone());
            if let Some(c) = found {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the client's Close span never reached the receiver"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_ne!(close_id, client.trace_id);
    wait_for(
        &spans,
        &close_id,
        &[
            ("nsm-manager@node-1", "nsm.manager/Close"),
            ("nsm-manager@node-2", "nsm.manager/Close"),
            ("nsm-forwarder@node-1", "nsm.forwarder/Remove"),
            ("nsm-forwarder@node-2", "nsm.forwarder/Remove"),
            ("nsm-endpoint@echo", "nsm.endpoint/Close"),
        ],
    );

    // Through a chain: the passthrough's onward Request (back to manager-1)
    // is a child of its own incoming Request, in the client's trace.
    let chained = RequestedConnection {
        id: format!("{}-web-nsm1", lab.name()),
        interface: "nsm1".into(),
        labels: [("app".to_string(), "chained".to_string())].into(),
        ..req
    };
    mesh::request(
        &lab.manager_socket("node-1"),
        &web_ns,
        &chained,
        false,
        TIMEOUT,
    )
    .expect("the chained request succeeds");
    telemetry.flush();
    let root = {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let found = spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| {
                    s.service == "trace-test"
                        && s.name == "nsm.client/Request"
                        && s.attrs.get("nsm.connection.id") == Some(&chained.id)
                })
                .cloned();
            if let Some(c) = found {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the chained request's client span never reached the receiver"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let got = wait_for(
        &spans,
        &root.trace_id,
        &[
            ("nsm-passthrough@insp-1", "nsm.endpoint/Request"),
            ("nsm-manager@node-2", "nsm.manager/Request"),
            ("nsm-endpoint@echo", "nsm.endpoint/Request"),
        ],
    );
    let pt = one(&got, "nsm-passthrough@insp-1", "nsm.endpoint/Request").clone();
    assert!(!pt.attrs["nsm.connection.id"].is_empty(), "{pt:?}");
    assert_eq!(pt.attrs["nsm.network_service"], "secure-net", "{pt:?}");
    // manager-1 exports on its own schedule: wait for the onward span.
    let deadline = Instant::now() + TIMEOUT;
    while !trace(&spans, &root.trace_id).iter().any(|s| {
        s.service == "nsm-manager@node-1"
            && s.name == "nsm.manager/Request"
            && s.parent == pt.span_id
    }) {
        assert!(
            Instant::now() < deadline,
            "no onward Request of manager-1 is a child of the passthrough's span: {:#?}",
            trace(&spans, &root.trace_id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(telemetry);
    lab.down().expect("teardown");
}
