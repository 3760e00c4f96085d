//! The CRDs against a real API server, and the checked-in YAML against the types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use nsm_k8s::crd::{self, NetworkService, NetworkServiceEndpoint};
use nsm_k8s::testing::ApiServer;

const CRDS_YAML: &str = include_str!("../../deploy/crds.yaml");

/// `deploy/crds.yaml` is what the Rust types generate; `NSM_BLESS=1` rewrites it.
#[test]
fn checked_in_crds_are_fresh() {
    let fresh = crd::yaml();
    if std::env::var_os("NSM_BLESS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds.yaml"),
            &fresh,
        )
        .unwrap();
        return;
    }
    assert!(
        fresh == CRDS_YAML,
        "deploy/crds.yaml is stale: run `cargo run -p nsm-k8s --bin nsm-crdgen > deploy/crds.yaml` \
         (or NSM_BLESS=1 cargo test -p nsm-k8s --test crds)"
    );
}

/// An NSM manifest, exactly as NSM's examples write one.
const NSM_SERVICE: &str = r#"
apiVersion: networkservicemesh.io/v1
kind: NetworkService
metadata:
  name: nse-composition
  namespace: nsm-system
spec:
  payload: ETHERNET
  matches:
    - source_selector:
        app: firewall
      routes:
        - destination_selector:
            app: vpn-gateway
    - routes:
        - destination_selector:
            app: firewall
"#;

#[tokio::test(flavor = "current_thread")]
async fn crds_apply_and_nsm_manifests_round_trip_through_a_real_api_server() {
    let server = ApiServer::start().expect("API server starts");
    let client = server.client().await.unwrap();

    // Apply the checked-in YAML as an operator would.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in CRDS_YAML
        .split("\n---\n")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
    {
        let crd: CustomResourceDefinition = serde_norway::from_str(doc).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("nsm-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(std::time::Duration::from_secs(20), established)
            .await
            .expect("CRD established in time")
            .unwrap();
    }

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "nsm-system"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    // An NSM manifest applies unchanged and reads back as the registry message.
    let services: Api<NetworkService> = Api::namespaced(client.clone(), "nsm-system");
    let manifest: serde_json::Value = serde_norway::from_str(NSM_SERVICE).unwrap();
    services
        .patch(
            "nse-composition",
            &PatchParams::apply("nsm-test"),
            &Patch::Apply(&manifest),
        )
        .await
        .expect("NSM manifest applies");
    let got = services.get("nse-composition").await.unwrap().to_registry();
    assert_eq!(got.name, "nse-composition");
    assert_eq!(got.payload, "ETHERNET");
    assert_eq!(got.matches.len(), 2);
    assert_eq!(got.matches[0].source_selector["app"], "firewall");
    assert_eq!(
        got.matches[1].routes[0].destination_selector["app"],
        "firewall"
    );

    // An endpoint written from a registry message reads back the same.
    let endpoints: Api<NetworkServiceEndpoint> = Api::namespaced(client.clone(), "nsm-system");
    let nse = nsm_proto::registry::NetworkServiceEndpoint {
        name: "firewall-1".into(),
        network_service_names: vec!["nse-composition".into()],
        network_service_labels: [(
            "nse-composition".to_string(),
            nsm_proto::registry::NetworkServiceLabels {
                labels: [("app".to_string(), "firewall".to_string())].into(),
            },
        )]
        .into(),
        url: "tcp://198.51.100.1:5001".into(),
        expiration_time: Some(prost_types::Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        }),
        ..Default::default()
    };
    endpoints
        .create(
            &PostParams::default(),
            &NetworkServiceEndpoint::from_registry(&nse),
        )
        .await
        .unwrap();
    assert_eq!(
        endpoints.get("firewall-1").await.unwrap().to_registry(),
        nse
    );

    // A spec that does not fit the schema is refused by the server.
    let bad = serde_json::json!({
        "apiVersion": "networkservicemesh.io/v1", "kind": "NetworkService",
        "metadata": {"name": "bad"}, "spec": {"matches": "not-a-list"}
    });
    let err = services
        .patch("bad", &PatchParams::apply("nsm-test"), &Patch::Apply(&bad))
        .await
        .expect_err("schema violation refused");
    assert!(err.to_string().contains("matches"), "{err}");
}
