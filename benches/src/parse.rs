//! Parsers for what the measuring tools print: iperf3's `-J` reports,
//! `ping`'s per-reply lines and `/proc/PID/stat`.
//!
//! They are pure functions over text so they are tested with captured
//! output, and they return `None` rather than guessing when a field is
//! missing: a figure the harness cannot read is reported as missing, never
//! as zero.

/// What one iperf3 TCP test delivered (receiver side).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpResult {
    /// Received bits per second.
    pub bits_per_second: f64,
    /// Received bytes.
    pub bytes: f64,
}

/// What one iperf3 UDP test delivered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpResult {
    /// Datagrams that arrived, per second of the test.
    pub delivered_pps: f64,
    /// Lost datagrams, percent of those sent.
    pub loss_percent: f64,
    /// Bytes that arrived.
    pub bytes: f64,
}

fn json(text: &str) -> Option<serde_json::Value> {
    // iperf3 reports its own failures inside the JSON as `error`.
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v.get("error").is_some() {
        return None;
    }
    Some(v)
}

/// iperf3 `-J` of a TCP test: `end.sum_received` (what the server got,
/// which is what crossed the data plane).
pub fn iperf3_tcp(text: &str) -> Option<TcpResult> {
    let v = json(text)?;
    let s = &v["end"]["sum_received"];
    Some(TcpResult {
        bits_per_second: s["bits_per_second"].as_f64()?,
        bytes: s["bytes"].as_f64()?,
    })
}

/// iperf3 `-J` of a UDP test. iperf3 3.x puts the receiver's view in
/// `end.sum_received` (newer) or only `end.sum` with the server's loss
/// count folded in (3.12); both carry `packets` (sent) and `lost_packets`.
pub fn iperf3_udp(text: &str) -> Option<UdpResult> {
    let v = json(text)?;
    let end = &v["end"];
    let s = if end["sum_received"]["packets"].is_number() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    let packets = s["packets"].as_f64()?;
    let lost = s["lost_packets"].as_f64()?.max(0.0);
    let seconds = s["seconds"].as_f64()?;
    if seconds <= 0.0 || packets <= 0.0 {
        return None;
    }
    let delivered = (packets - lost).max(0.0);
    let size = s["bytes"].as_f64().map_or(0.0, |b| b / packets);
    Some(UdpResult {
        delivered_pps: delivered / seconds,
        loss_percent: 100.0 * lost / packets,
        bytes: delivered * size,
    })
}

/// Round-trip times in microseconds from `ping`'s `... time=0.123 ms`
/// lines, in order (replies only).
pub fn ping_rtts_us(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| {
            let t = l.split("time=").nth(1)?;
            let mut it = t.split_whitespace();
            let value: f64 = it.next()?.parse().ok()?;
            let scale = match it.next() {
                Some("s") => 1e6,
                Some("us") | Some("µs") => 1.0,
                _ => 1e3,
            };
            Some(value * scale)
        })
        .collect()
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`.
/// Fields are counted after the last `)`, because the command name in
/// parentheses may itself hold spaces and parentheses.
pub fn proc_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of stat(5), so utime (14) and stime (15)
    // are at 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = r#"{"start":{},"intervals":[],"end":{
        "sum_sent":{"start":0,"end":5.0,"seconds":5.0,"bytes":10000000000,"bits_per_second":1.6e10,"retransmits":3},
        "sum_received":{"start":0,"end":5.0,"seconds":5.0,"bytes":9990000000,"bits_per_second":1.5984e10}}}"#;

    // Trimmed from iperf 3.12 `-u -b 0 -l 64 -J` (client side).
    const UDP_312: &str = r#"{"start":{},"end":{"streams":[],
        "sum":{"start":0,"end":2.000045,"seconds":2.000045,"bytes":12800000,"bits_per_second":51198848,
               "jitter_ms":0.002,"lost_packets":50000,"packets":200000,"lost_percent":25,"sender":true},
        "cpu_utilization_percent":{}}}"#;

    #[test]
    fn tcp_receiver_side() {
        let r = iperf3_tcp(TCP).expect("parses");
        assert_eq!(r.bits_per_second, 1.5984e10);
        assert_eq!(r.bytes, 9.99e9);
    }

    #[test]
    fn iperf3_error_is_none() {
        assert_eq!(
            iperf3_tcp(r#"{"start":{},"end":{},"error":"unable to connect to server"}"#),
            None
        );
        assert_eq!(iperf3_tcp("not json"), None);
        assert_eq!(iperf3_udp("{}"), None);
    }

    #[test]
    fn udp_delivered_rate_and_loss() {
        let r = iperf3_udp(UDP_312).expect("parses");
        assert!((r.delivered_pps - 150_000.0 / 2.000045).abs() < 1e-6);
        assert_eq!(r.loss_percent, 25.0);
        assert!((r.bytes - 150_000.0 * 64.0).abs() < 1e-6);
    }

    #[test]
    fn udp_prefers_sum_received() {
        let j = r#"{"end":{"sum":{"packets":10,"lost_packets":0,"seconds":1,"bytes":640},
            "sum_received":{"packets":10,"lost_packets":5,"seconds":1,"bytes":640}}}"#;
        assert_eq!(iperf3_udp(j).expect("parses").delivered_pps, 5.0);
    }

    #[test]
    fn ping_lines() {
        let text = "PING 172.31.0.1 (172.31.0.1) 56(84) bytes of data.\n\
            64 bytes from 172.31.0.1: icmp_seq=1 ttl=64 time=0.081 ms\n\
            64 bytes from 172.31.0.1: icmp_seq=2 ttl=64 time=1.50 ms\n\
            From 172.31.0.2 icmp_seq=3 Destination Host Unreachable\n\
            \n--- 172.31.0.1 ping statistics ---\n\
            rtt min/avg/max/mdev = 0.081/0.790/1.500/0.709 ms\n";
        assert_eq!(ping_rtts_us(text), vec![81.0, 1500.0]);
        assert!(ping_rtts_us("100% packet loss").is_empty());
    }

    #[test]
    fn proc_stat_with_odd_name() {
        let stat = "4242 (wireguard (go)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
            150 75 0 0 20 0 9 0 12345 800000000 3000 18446744073709551615 \
            1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(proc_stat_ticks(stat), Some(225));
        assert_eq!(proc_stat_ticks("garbage"), None);
    }
}
