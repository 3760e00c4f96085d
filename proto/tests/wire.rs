//! Wire compatibility with NSM: field numbers and enum values, checked as
//! bytes.
//!
//! A wrong field number still round-trips through our own code, so the only
//! way to catch one is to compare with bytes written from NSM's `.proto`
//! definitions by hand. Each expected array below is annotated with the
//! protobuf encoding it spells: a tag byte is `(field_number << 3) | wire_type`,
//! wire type 0 = varint, 2 = length-delimited.

use nsm_proto::connection::{
    Connection, ConnectionEventType, Mechanism, MonitorScopeSelector, State,
};
use nsm_proto::connectioncontext::{ConnectionContext, IpContext, PolicyRoute, Route, ip_family};
use nsm_proto::forwarder::v1 as fwd;
use nsm_proto::ipam::{PrefixRequest, PrefixResponse, Type as PrefixType};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use prost::Message;

/// `tag, len, bytes` of a length-delimited string field.
fn string_field(tag: u8, value: &str) -> Vec<u8> {
    let len = u8::try_from(value.len()).expect("test strings are short");
    let mut out = vec![tag, len];
    out.extend_from_slice(value.as_bytes());
    out
}

#[test]
fn connection_state_is_field_9() {
    let conn = Connection {
        state: State::Down.into(),
        ..Default::default()
    };
    // field 9, varint (9 << 3 | 0 = 0x48), DOWN = 1
    assert_eq!(conn.encode_to_vec(), [0x48, 0x01]);
}

#[test]
fn connection_fields_1_to_8() {
    let conn = Connection {
        id: "c".into(),
        network_service: "ns".into(),
        network_service_endpoint_name: "e".into(),
        payload: "IP".into(),
        ..Default::default()
    };
    let mut expected = string_field(0x0a, "c"); // 1: id
    expected.extend(string_field(0x12, "ns")); // 2: network_service
    expected.extend(string_field(0x3a, "e")); // 7: network_service_endpoint_name
    expected.extend(string_field(0x42, "IP")); // 8: payload
    assert_eq!(conn.encode_to_vec(), expected);
}

#[test]
fn connection_context_mtu_is_field_5() {
    let ctx = ConnectionContext {
        mtu: 1400,
        ..Default::default()
    };
    // field 5, varint (0x28); 1400 = 0b1010_1111000 -> 0xf8 0x0a
    assert_eq!(ctx.encode_to_vec(), [0x28, 0xf8, 0x0a]);
}

#[test]
fn route_next_hop_is_field_2() {
    let route = Route {
        prefix: String::new(),
        next_hop: "10.0.0.1".into(),
    };
    assert_eq!(route.encode_to_vec(), string_field(0x12, "10.0.0.1"));
}

#[test]
fn ip_context_policies_is_field_11() {
    let ip = IpContext {
        policies: vec![PolicyRoute {
            proto: "6".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    // field 11, length-delimited (11 << 3 | 2 = 0x5a), holding PolicyRoute.proto = 2
    assert_eq!(ip.encode_to_vec(), [0x5a, 0x03, 0x12, 0x01, b'6']);
}

#[test]
fn mechanism_parameters_is_a_map_at_field_3() {
    let mech = Mechanism {
        cls: String::new(),
        r#type: String::new(),
        parameters: [("name".to_owned(), "nsm-1".to_owned())].into(),
    };
    // field 3 holds one map entry: key = 1, value = 2
    let mut entry = string_field(0x0a, "name");
    entry.extend(string_field(0x12, "nsm-1"));
    let mut expected = vec![0x1a, u8::try_from(entry.len()).expect("short")];
    expected.extend(entry);
    assert_eq!(mech.encode_to_vec(), expected);
}

#[test]
fn monitor_scope_selector_network_services_is_field_2() {
    let sel = MonitorScopeSelector {
        path_segments: vec![],
        network_services: vec!["ns".into()],
    };
    assert_eq!(sel.encode_to_vec(), string_field(0x12, "ns"));
}

#[test]
fn prefix_response_starts_at_field_2() {
    let resp = PrefixResponse {
        prefix: "10.0.0.0/24".into(),
        exclude_prefixes: vec!["10.0.0.0/30".into()],
    };
    let mut expected = string_field(0x12, "10.0.0.0/24");
    expected.extend(string_field(0x1a, "10.0.0.0/30"));
    assert_eq!(resp.encode_to_vec(), expected);

    let req = PrefixRequest {
        r#type: PrefixType::Allocate.into(),
        ..Default::default()
    };
    assert_eq!(req.encode_to_vec(), [0x08, 0x01]);
}

#[test]
fn endpoint_timestamps_and_path_ids() {
    let nse = NetworkServiceEndpoint {
        expiration_time: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        path_ids: vec!["p".into()],
        ..Default::default()
    };
    let mut expected = vec![0x2a, 0x02, 0x08, 0x01]; // 5: Timestamp { seconds = 1 }
    expected.extend(string_field(0x3a, "p")); // 7: path_ids
    assert_eq!(nse.encode_to_vec(), expected);
}

#[test]
fn decodes_a_hand_made_request() {
    let mut conn = string_field(0x0a, "c1"); // Connection.id
    conn.extend(string_field(0x12, "web")); // Connection.network_service
    conn.extend([0x48, 0x03]); // Connection.state = RESELECT_REQUESTED
    let mut mech = string_field(0x0a, "LOCAL"); // Mechanism.cls
    mech.extend(string_field(0x12, "KERNEL")); // Mechanism.type

    let mut bytes = vec![0x0a, u8::try_from(conn.len()).expect("short")];
    bytes.extend(conn);
    bytes.extend([0x12, u8::try_from(mech.len()).expect("short")]);
    bytes.extend(mech);

    let req = NetworkServiceRequest::decode(bytes.as_slice()).expect("valid protobuf");
    let conn = req.connection.expect("connection is set");
    assert_eq!(conn.id, "c1");
    assert_eq!(conn.network_service, "web");
    assert_eq!(conn.state(), State::ReselectRequested);
    assert_eq!(req.mechanism_preferences.len(), 1);
    assert_eq!(req.mechanism_preferences[0].cls, "LOCAL");
    assert_eq!(req.mechanism_preferences[0].r#type, "KERNEL");
}

#[test]
fn unknown_enum_values_survive_a_round_trip() {
    // A newer NSM peer may send a State we do not know; relaying the
    // connection must not rewrite it.
    let conn = Connection::decode([0x48, 0x2a].as_slice()).expect("valid protobuf");
    assert_eq!(conn.state, 42);
    assert!(State::try_from(conn.state).is_err());
    assert_eq!(conn.encode_to_vec(), [0x48, 0x2a]);
}

#[test]
fn enum_numbers_and_names_match_nsm() {
    assert_eq!(State::Up as i32, 0);
    assert_eq!(State::Down as i32, 1);
    assert_eq!(State::RefreshRequested as i32, 2);
    assert_eq!(State::ReselectRequested as i32, 3);
    assert_eq!(State::ReselectRequested.as_str_name(), "RESELECT_REQUESTED");
    assert_eq!(ConnectionEventType::InitialStateTransfer as i32, 0);
    assert_eq!(ConnectionEventType::Update as i32, 1);
    assert_eq!(ConnectionEventType::Delete as i32, 2);
    assert_eq!(ip_family::Family::Ipv4 as i32, 0);
    assert_eq!(ip_family::Family::Ipv6 as i32, 1);
    assert_eq!(PrefixType::Undefined as i32, 0);
    assert_eq!(PrefixType::Delete as i32, 2);
    assert_eq!(PrefixType::Delete.as_str_name(), "DELETE");
}

#[test]
fn forwarder_side_oneof_numbers() {
    let kernel = fwd::CrossConnect {
        id: String::new(),
        source: Some(fwd::Side {
            kind: Some(fwd::side::Kind::Kernel(fwd::KernelInterface {
                name: "nsm-1".into(),
                ..Default::default()
            })),
        }),
        destination: None,
        chain: None,
    };
    // CrossConnect.source = 2 { Side.kernel = 1 { KernelInterface.name = 2 } }
    let iface = string_field(0x12, "nsm-1");
    let mut side = vec![0x0a, u8::try_from(iface.len()).expect("short")];
    side.extend(iface);
    let mut expected = vec![0x12, u8::try_from(side.len()).expect("short")];
    expected.extend(side);
    assert_eq!(kernel.encode_to_vec(), expected);

    let wg = fwd::Side {
        kind: Some(fwd::side::Kind::Wireguard(fwd::WireguardTunnel {
            peer_port: 51820,
            ..Default::default()
        })),
    };
    // Side.wireguard = 2 { WireguardTunnel.peer_port = 2: 51820 -> 0xec 0x94 0x03 }
    assert_eq!(wg.encode_to_vec(), [0x12, 0x04, 0x10, 0xec, 0x94, 0x03]);
    assert_eq!(fwd::Side::decode(wg.encode_to_vec().as_slice()), Ok(wg));
}

#[test]
fn forwarder_enums() {
    assert_eq!(fwd::Payload::Ip as i32, 0);
    assert_eq!(fwd::Payload::Ethernet as i32, 1);
    assert_eq!(fwd::cross_connect_status::State::Pending as i32, 0);
    assert_eq!(fwd::cross_connect_status::State::Up as i32, 1);
    assert_eq!(fwd::cross_connect_status::State::Down as i32, 2);
    assert_eq!(fwd::cross_connect_event::Type::Snapshot as i32, 0);
    assert_eq!(fwd::cross_connect_event::Type::Delete as i32, 2);
}
