//! A minimal UDP packet-rate tool: a sender that sends fixed-size datagrams
//! as fast as one thread can for a fixed time, and a receiver that counts
//! what arrives. `nsm-bench-udp` runs them inside the pods.
//!
//! Why not iperf3 for this: iperf3's UDP mode does a timer and select()
//! round per datagram, so with small packets its receiver, not the data
//! plane under test, is the limit (about 90k packets/s delivered of 160k
//! sent over plain loopback on this machine). One `send` and one `recv`
//! syscall per packet and nothing else leaves the data plane as the
//! bottleneck, the same way for every implementation.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// IPv4 + UDP header bytes: a datagram of IP size S carries S - 28 bytes.
pub const HEADERS: usize = 28;

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

/// Sends datagrams of IP size `size` (>= 29) to `to` for `duration`.
/// Errors of single sends (a full queue: ENOBUFS, or ECONNREFUSED before
/// the receiver is up) are not counted as sent and do not stop it.
pub fn send(to: SocketAddr, size: usize, duration: Duration) -> io::Result<Counts> {
    let payload = size.saturating_sub(HEADERS).max(1);
    let sock = UdpSocket::bind(("0.0.0.0", 0))?;
    sock.connect(to)?;
    let buf = vec![0x5au8; payload];
    let start = Instant::now();
    let mut packets = 0u64;
    'outer: loop {
        // Check the clock once per batch: a clock read per packet would be
        // a measurable share of the cost of small packets.
        for _ in 0..256 {
            if sock.send(&buf).is_ok() {
                packets += 1;
            }
        }
        if start.elapsed() >= duration {
            break 'outer;
        }
    }
    Ok(Counts {
        packets,
        bytes: packets * payload as u64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Counts datagrams arriving on `port` until `idle` passes without one
/// (after the first), or `max_wait` in all.
pub fn receive(port: u16, idle: Duration, max_wait: Duration) -> io::Result<Counts> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let begin = Instant::now();
    let mut buf = vec![0u8; 65536];
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = begin;
    while begin.elapsed() < max_wait {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                packets += 1;
                bytes += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if first.is_some() && last.elapsed() >= idle {
                    break;
                }
            }
            Err(e) => return Err(e),
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
