//! `nsm-crdgen`: prints the CRDs of nsm-rs as YAML (what `deploy/crds.yaml`
//! holds). `cargo run -p nsm-k8s --bin nsm-crdgen > deploy/crds.yaml`.

fn main() {
    if std::env::args().len() > 1 {
        eprintln!(
            "usage: nsm-crdgen > deploy/crds.yaml  (prints the CRDs of nsm-rs as YAML; takes no arguments)"
        );
        std::process::exit(2);
    }
    print!("{}", nsm_k8s::crd::yaml());
}
