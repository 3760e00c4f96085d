//! `nsm-k8s`: nsm-rs on Kubernetes.
//!
//! Owns the custom resources NSM defines in group `networkservicemesh.io`,
//! version `v1` ([`crd`]: `NetworkService`, `NetworkServiceEndpoint`, with
//! NSM's field names so NSM manifests apply unchanged), their CRD YAML
//! (checked in as `deploy/crds.yaml`, kept fresh by a test), and the test
//! harness that runs a real etcd and kube-apiserver on loopback
//! ([`testing`]).
//!
//! It must never hold mesh logic: the manager decides, this crate only
//! shapes and stores. It never talks to a cluster it was not pointed at.

pub mod crd;
pub mod testing;
