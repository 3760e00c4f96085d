//! pcap framing for `mirror` copies, into the caller's buffer.
//!
//! The classic libpcap format (microsecond timestamps, little-endian),
//! which every tool reads. Link type [`LINKTYPE_RAW`]: records are bare
//! IPv4/IPv6 packets, which is what the chain sees. No file I/O here: the
//! forwarder writes [`global_header`] once, then a [`record_header`] and
//! the bytes from [`super::mirror::MirrorReader::pop`] per copy.

use std::time::Duration;

/// Bytes in the file header.
pub const GLOBAL_HEADER_LEN: usize = 24;
/// Bytes in each record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// LINKTYPE_RAW: the packet begins with an IPv4 or IPv6 header.
pub const LINKTYPE_RAW: u32 = 101;
const MAGIC_MICROS: u32 = 0xa1b2_c3d4;

/// Writes the file header to the start of `out`; returns its length, or
/// `None` if `out` is shorter than [`GLOBAL_HEADER_LEN`].
pub fn global_header(out: &mut [u8], snaplen: u32, linktype: u32) -> Option<usize> {
    let out = out.get_mut(..GLOBAL_HEADER_LEN)?;
    out[0..4].copy_from_slice(&MAGIC_MICROS.to_le_bytes());
    out[4..6].copy_from_slice(&2u16.to_le_bytes()); // version 2.4
    out[6..8].copy_from_slice(&4u16.to_le_bytes());
    out[8..16].fill(0); // thiszone, sigfigs
    out[16..20].copy_from_slice(&snaplen.to_le_bytes());
    out[20..24].copy_from_slice(&linktype.to_le_bytes());
    Some(GLOBAL_HEADER_LEN)
}

/// Writes one record header to the start of `out`: `ts` is the wall-clock
/// time since the Unix epoch, `captured` the bytes that follow, `orig_len`
/// the packet's real length. Returns its length, or `None` if `out` is
/// shorter than [`RECORD_HEADER_LEN`]. Seconds past 2106 wrap (the format's
/// limit).
pub fn record_header(
    out: &mut [u8],
    ts: Duration,
    captured: usize,
    orig_len: usize,
) -> Option<usize> {
    let out = out.get_mut(..RECORD_HEADER_LEN)?;
    let u32_of = |n: u64| u32::try_from(n & u64::from(u32::MAX)).unwrap_or(0);
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&u32_of(ts.as_secs()).to_le_bytes());
    out[4..8].copy_from_slice(&ts.subsec_micros().to_le_bytes());
    out[8..12].copy_from_slice(&len32(captured).to_le_bytes());
    out[12..16].copy_from_slice(&len32(orig_len).to_le_bytes());
    Some(RECORD_HEADER_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_libpcap_format() {
        let mut buf = [0u8; 64];
        assert_eq!(global_header(&mut buf, 65535, LINKTYPE_RAW), Some(24));
        assert_eq!(&buf[..8], &[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0]);
        assert_eq!(&buf[16..24], &[0xff, 0xff, 0, 0, 101, 0, 0, 0]);
        let ts = Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(record_header(&mut buf, ts, 60, 1500), Some(16));
        assert_eq!(
            u32::from_le_bytes(buf[0..4].try_into().expect("4")),
            1_700_000_000
        );
        assert_eq!(
            u32::from_le_bytes(buf[4..8].try_into().expect("4")),
            123_456
        );
        assert_eq!(u32::from_le_bytes(buf[8..12].try_into().expect("4")), 60);
        assert_eq!(u32::from_le_bytes(buf[12..16].try_into().expect("4")), 1500);
        assert_eq!(global_header(&mut buf[..23], 1, 1), None);
        assert_eq!(record_header(&mut buf[..15], ts, 1, 1), None);
    }
}
