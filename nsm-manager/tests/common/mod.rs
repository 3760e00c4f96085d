//! Helpers shared by the nsm-manager integration tests.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nsm_proto::connection::Connection;
use nsm_proto::mechanisms::kernel;
use nsm_proto::networkservice::NetworkServiceRequest;

/// `inode://DEV/INO` of this process's network namespace.
fn own_netns_inode_url() -> String {
    let m = std::fs::metadata("/proc/self/ns/net").unwrap();
    format!("inode://{}/{}", m.dev(), m.ino())
}

/// A client's request for `service` with a KERNEL interface `ifname` in this
/// process's namespace, carrying `labels`.
pub(crate) fn kernel_request(
    service: &str,
    ifname: &str,
    labels: &[(&str, &str)],
) -> NetworkServiceRequest {
    let mut k = kernel::local(ifname, Path::new("/proc/self/ns/net"));
    k.parameters
        .insert(kernel::INODE_URL.into(), own_netns_inode_url());
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: service.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        mechanism_preferences: vec![k],
    }
}
