//! A minimal UDP packet-rate tool: a sender that sends fixed-size datagrams
//! as fast as one thread can for a fixed time, and a receiver that counts
//! what arrives. `nsm-bench-udp` runs them inside the pods.
//!
//! Why not iperf3 for this: iperf3's UDP mode does a timer and select()
//! round per datagram, so with small packets its receiver, not the data
//! plane under test, is the limit (about 90k packets/s delivered of 160k
//! sent over plain loopback on this machine). Why batches: with one `send`
//! and one `recv` per datagram the tool itself was the limit too (71k
//! packets/s over plain veth, 2026-11-21). `sendmmsg` and `recvmmsg` of
//! [`BATCH`] datagrams leave the kernel's per-datagram path and the data
//! plane under test as the cost, the same way for every implementation.
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// IPv4 + UDP header bytes: a datagram of IP size S carries S - 28 bytes.
pub const HEADERS: usize = 28;
/// Datagrams per `sendmmsg`/`recvmmsg`.
pub const BATCH: usize = 64;
/// [`BATCH`] as the syscalls take it.
const BATCH_C: libc::c_uint = 64;

/// What one side counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    /// Datagrams sent or received.
    pub packets: u64,
    /// Payload bytes sent or received.
    pub bytes: u64,
    /// Sender: how long it sent; receiver: first to last arrival.
    pub seconds: f64,
}

impl Counts {
    /// The one line a side prints: `packets=N bytes=N seconds=F`.
    pub fn line(&self) -> String {
        format!(
            "packets={} bytes={} seconds={:.6}",
            self.packets, self.bytes, self.seconds
        )
    }

    /// Parses [`Counts::line`] (the last such line of `text`).
    pub fn parse(text: &str) -> Option<Counts> {
        let line = text.lines().rev().find(|l| l.starts_with("packets="))?;
        let mut c = Counts {
            packets: 0,
            bytes: 0,
            seconds: 0.0,
        };
        let mut seen = 0;
        for kv in line.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            match k {
                "packets" => c.packets = v.parse().ok()?,
                "bytes" => c.bytes = v.parse().ok()?,
                "seconds" => c.seconds = v.parse().ok()?,
                _ => continue,
            }
            seen += 1;
        }
        (seen == 3).then_some(c)
    }
}

/// Sends datagrams of IP size `size` (>= 29) to `to` for `duration`, in
/// `sendmmsg` batches of [`BATCH`]. Datagrams a batch could not send (a
/// full queue: ENOBUFS, or ECONNREFUSED before the receiver is up) are not
/// counted as sent and do not stop it.
pub fn send(to: SocketAddr, size: usize, duration: Duration) -> io::Result<Counts> {
    let payload = size.saturating_sub(HEADERS).max(1);
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.connect(to)?;
    let mut buf = vec![0x5au8; payload];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: payload,
    };
    // Every message points at the same payload: the content does not
    // matter, only the count.
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut packets = 0u64;
    let mut rounds = 0u32;
    loop {
        // SAFETY: `msgs` holds BATCH initialised headers whose iovec points
        // into `buf`, both alive for the call; the socket is connected, so
        // no address is needed.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH_C, 0) };
        if n > 0 {
            packets += n as u64;
        }
        rounds += 1;
        // Check the clock every few batches, not per datagram.
        if rounds.is_multiple_of(16) && start.elapsed() >= duration {
            break;
        }
    }
    Ok(Counts {
        packets,
        bytes: packets * payload as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Counts datagrams arriving on `port` until `idle` passes without one
/// (after the first), or `max_wait` in all; `recvmmsg` of up to [`BATCH`].
pub fn receive(port: u16, idle: Duration, max_wait: Duration) -> io::Result<Counts> {
    const SLOT: usize = 65536;
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let begin = Instant::now();
    let mut bufs = vec![0u8; SLOT * BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_mut(SLOT)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: SLOT,
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(&mut iovs) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = begin;
    while begin.elapsed() < max_wait {
        // MSG_WAITFORONE: block (up to the socket's timeout) for the first
        // datagram only, then take what is queued.
        // SAFETY: every header points at its own SLOT-byte iovec into
        // `bufs`, all alive for the call; no timeout pointer.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH_C,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            packets += n as u64;
            bytes += msgs[..n as usize]
                .iter()
                .map(|m| u64::from(m.msg_len))
                .sum::<u64>();
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                if first.is_some() && last.elapsed() >= idle {
                    break;
                }
            }
            _ => return Err(e),
        }
    }
    Ok(Counts {
        packets,
        bytes,
        seconds: first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_line_round_trip() {
        let c = Counts {
            packets: 123_456,
            bytes: 4_444_416,
            seconds: 2.000_5,
        };
        assert_eq!(Counts::parse(&format!("noise\n{}\n", c.line())), Some(c));
        assert_eq!(Counts::parse("packets=1 bytes=2"), None);
        assert_eq!(Counts::parse(""), None);
    }
}
