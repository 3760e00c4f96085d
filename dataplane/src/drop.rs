//! Why a packet was dropped.
//!
//! A drop is not an error to propagate or log: it is a fact to count. Every
//! path that discards a packet returns one [`DropReason`], and the caller of
//! the pipeline bumps exactly one counter for it (per cross-connect when the
//! packet could be attributed to one, globally otherwise). The enum is `Copy`
//! and one byte wide so that returning it costs nothing, and [`DropReason::as_str`]
//! gives the stable metric label.

/// Every reason the data path can discard a packet.
///
/// The names returned by [`DropReason::as_str`] are part of the metrics
/// interface: never rename one, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum DropReason {
    // --- ingress parsing -------------------------------------------------
    /// Shorter than the smallest header of its kind, or shorter than the
    /// length its own header claims (truncated).
    TooShort,
    /// The IP version nibble is neither 4 nor 6.
    BadIpVersion,
    /// A header field is inconsistent: IPv4 IHL below 5, total length below
    /// the header length, a broken IPv6 extension-header chain, a malformed
    /// ARP or Neighbor Discovery message.
    MalformedHeader,
    /// The frame carries something this connection does not carry: an
    /// EtherType other than IPv4, IPv6 and ARP on a TAP (including VLAN tags).
    PayloadMismatch,
    /// An ARP packet that is not a request for the peer's address (gratuitous
    /// ARP, replies, requests for other addresses). Consumed, never forwarded.
    ArpIgnored,
    /// A Neighbor Solicitation that is not for the peer's address, or a
    /// duplicate-address-detection probe. Consumed, never forwarded.
    NeighborSolicitationIgnored,

    // --- programming -----------------------------------------------------
    /// The packet came from a [`crate::PortId`] that was never added.
    UnknownPort,
    /// The port exists but no cross-connect is attached to it (never
    /// programmed, or removed).
    NoCrossConnect,

    // --- MTU ---------------------------------------------------------------
    /// Larger than the connection's path MTU; an ICMP "fragmentation needed"
    /// or ICMPv6 "packet too big" was returned to the sender instead.
    PacketTooBig,
    /// An IPv4 packet larger than the path MTU without the DF bit. The data
    /// plane never fragments, and RFC 1191 reserves the ICMP reply for DF
    /// packets, so it is dropped silently (the pod's own interface MTU is set
    /// to the path MTU, so only a misconfigured pod gets here).
    PacketTooBigNoDf,
    /// Too big for the path, but no ICMP error may be sent about it (it is
    /// itself an ICMP error, a non-first fragment, or its source is not a
    /// unicast address).
    PacketTooBigNoReply,

    // --- service chain -----------------------------------------------------
    /// Denied by an `acl` stage.
    AclDenied,
    /// Over a `ratelimit` stage's budget.
    RateLimited,
    /// Dropped on purpose by a `fault` stage.
    FaultInjected,
    /// Any other stage verdict (a stage that cannot process the packet, e.g.
    /// `nat44` without a free mapping).
    StageRejected,
    /// A stateful stage (`acl`) had no room for a new flow in its
    /// fixed-size connection table.
    ConntrackFull,
    /// `nat44` found no free port (or table slot) for a new mapping.
    NatExhausted,
    /// A packet to the `nat44` address that belongs to no mapping.
    NatNoMapping,
    /// A packet `nat44` cannot translate: neither TCP, UDP nor ICMP echo,
    /// a later fragment, or a truncated upper-layer header.
    NatUntranslatable,

    // --- WireGuard -----------------------------------------------------------
    /// Not a WireGuard message: unknown type, non-zero reserved bytes, or the
    /// wrong size for its type.
    WgBadMessage,
    /// A response, cookie reply or data message whose receiver index names no
    /// live session (never existed, removed, or stale generation).
    WgUnknownReceiverIndex,
    /// A handshake initiation whose mac1 matches no session's static key.
    WgNoSessionForInitiation,
    /// mac1 did not verify for the session the message was addressed to.
    WgBadMac,
    /// Authenticated decryption failed (wrong key, forged or corrupted data).
    WgDecryptFailed,
    /// Replayed data counter, or an initiation whose timestamp is not newer
    /// than the last one accepted.
    WgReplay,
    /// Handshake refused under load: the session's cookie rate limiter (or
    /// the data plane's limit on unaddressed initiations) said no.
    WgHandshakeRateLimited,
    /// A data message for a session whose keys are gone (expired), or a
    /// response to a handshake that is no longer in progress.
    WgNoSession,
    /// No session is established yet and the handshake queue (256 packets
    /// per session, boringtun's) is full.
    WgQueueFull,
    /// The decrypted inner packet is not a well-formed IPv4/IPv6 packet.
    WgBadInnerPacket,
    /// Any other WireGuard protocol error (reported by boringtun).
    WgProtocolError,

    // --- caller ----------------------------------------------------------------
    /// The caller's output buffer is too small for the result (see
    /// [`crate::Dataplane::out_len`]). A bug in the caller, counted rather
    /// than panicked on.
    BufferTooSmall,
}

impl DropReason {
    /// Every reason, in declaration order; `ALL[r as usize] == r`.
    pub const ALL: [DropReason; 31] = [
        DropReason::TooShort,
        DropReason::BadIpVersion,
        DropReason::MalformedHeader,
        DropReason::PayloadMismatch,
        DropReason::ArpIgnored,
        DropReason::NeighborSolicitationIgnored,
        DropReason::UnknownPort,
        DropReason::NoCrossConnect,
        DropReason::PacketTooBig,
        DropReason::PacketTooBigNoDf,
        DropReason::PacketTooBigNoReply,
        DropReason::AclDenied,
        DropReason::RateLimited,
        DropReason::FaultInjected,
        DropReason::StageRejected,
        DropReason::ConntrackFull,
        DropReason::NatExhausted,
        DropReason::NatNoMapping,
        DropReason::NatUntranslatable,
        DropReason::WgBadMessage,
        DropReason::WgUnknownReceiverIndex,
        DropReason::WgNoSessionForInitiation,
        DropReason::WgBadMac,
        DropReason::WgDecryptFailed,
        DropReason::WgReplay,
        DropReason::WgHandshakeRateLimited,
        DropReason::WgNoSession,
        DropReason::WgQueueFull,
        DropReason::WgBadInnerPacket,
        DropReason::WgProtocolError,
        DropReason::BufferTooSmall,
    ];

    /// Number of reasons: the size of a per-reason counter array.
    pub const COUNT: usize = Self::ALL.len();

    /// Stable snake_case name, used as the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::BadIpVersion => "bad_ip_version",
            DropReason::MalformedHeader => "malformed_header",
            DropReason::PayloadMismatch => "payload_mismatch",
            DropReason::ArpIgnored => "arp_ignored",
            DropReason::NeighborSolicitationIgnored => "neighbor_solicitation_ignored",
            DropReason::UnknownPort => "unknown_port",
            DropReason::NoCrossConnect => "no_cross_connect",
            DropReason::PacketTooBig => "packet_too_big",
            DropReason::PacketTooBigNoDf => "packet_too_big_no_df",
            DropReason::PacketTooBigNoReply => "packet_too_big_no_reply",
            DropReason::AclDenied => "acl_denied",
            DropReason::RateLimited => "rate_limited",
            DropReason::FaultInjected => "fault_injected",
            DropReason::StageRejected => "stage_rejected",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::NatExhausted => "nat_exhausted",
            DropReason::NatNoMapping => "nat_no_mapping",
            DropReason::NatUntranslatable => "nat_untranslatable",
            DropReason::WgBadMessage => "wg_bad_message",
            DropReason::WgUnknownReceiverIndex => "wg_unknown_receiver_index",
            DropReason::WgNoSessionForInitiation => "wg_no_session_for_initiation",
            DropReason::WgBadMac => "wg_bad_mac",
            DropReason::WgDecryptFailed => "wg_decrypt_failed",
            DropReason::WgReplay => "wg_replay",
            DropReason::WgHandshakeRateLimited => "wg_handshake_rate_limited",
            DropReason::WgNoSession => "wg_no_session",
            DropReason::WgQueueFull => "wg_queue_full",
            DropReason::WgBadInnerPacket => "wg_bad_inner_packet",
            DropReason::WgProtocolError => "wg_protocol_error",
            DropReason::BufferTooSmall => "buffer_too_small",
        }
    }

    /// Position in [`DropReason::ALL`], for indexing counter arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn all_is_in_declaration_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
        // The last variant's discriminant + 1 is the count: nothing missing.
        assert_eq!(DropReason::BufferTooSmall.index() + 1, DropReason::COUNT);
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for r in DropReason::ALL {
            let name = r.as_str();
            assert!(seen.insert(name), "duplicate name {name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name} is not snake_case"
            );
            assert_eq!(r.to_string(), name);
        }
    }

    #[test]
    fn is_one_byte() {
        assert_eq!(core::mem::size_of::<DropReason>(), 1);
        assert_eq!(core::mem::size_of::<Option<DropReason>>(), 1);
    }
}
