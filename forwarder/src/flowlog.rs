//! Flow logs (`--flow-log FILE`): one JSON line per finished flow.
//!
//! The packet thread does only what `nsm_dataplane::stages::flowlog`
//! allows (a sampled, preallocated flow table per chain and a lock-free
//! ring of fixed-size records); everything that allocates, formats or
//! blocks happens here, on one writer thread that empties every chain's
//! ring each [`DRAIN_PERIOD`], applies the rate limit (`--flow-log-rate`)
//! and appends to the file. A slow disk fills the rings, never the packets:
//! lost records are counted (`ring_full`, `rate_limited`, ...) and exported
//! as metrics ([`FlowLog::stats`]).
//!
//! The log is process-wide (one file per forwarder), installed once at
//! start ([`install`]); [`crate::chain::build`] registers each chain's
//! reader with it.
//!
//! # Record format
//! One JSON object a line, fields in this order:
//! `connection` (cross-connect id), `start_unix_ms`, `end_unix_ms`,
//! `proto` (IP protocol number), `src`, `dst`, `src_port`, `dst_port`
//! (as the flow's first packet carried them; ports 0 without TCP/UDP, the
//! echo id for ICMP echo), `direction` (`forward`: the first packet went
//! from the connection's source to its destination; `reverse`),
//! `orig_packets`, `orig_bytes` (the first packet's direction, IP bytes),
//! `reply_packets`, `reply_bytes`, `functions` (one
//! `{"index","name","verdict"}` per chain function, verdict `pass`, `hold`,
//! `drop` or `not_run`), `drop_reason` (the last one, or null), and `end`
//! (`idle`, `active`: an interim record of a long flow, `closed`: the chain
//! was replaced or the connection removed).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nsm_dataplane::Direction;
use nsm_dataplane::stages::{FlowLogReader, FlowLogSnapshot, FlowLogSpec, FlowRecord};

/// How often the writer empties the rings. At the default ring of 1,024
/// records a chain, that keeps up with about 10,000 finished flows a
/// second per connection.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(100);

/// The flow log's settings (from the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowLogConfig {
    /// The file records are appended to (created with mode 0600).
    pub path: PathBuf,
    /// Log 1 flow in this many (1: every flow).
    pub sample: u32,
    /// At most this many records a second (0: no limit); the excess is
    /// counted, not written.
    pub rate: u32,
    /// The per-chain table and ring sizes and timeouts.
    pub spec: FlowLogSpec,
}

/// What the flow log did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLogStats {
    /// Records appended to the file.
    pub written: u64,
    /// Records lost because a chain's ring was full.
    pub ring_full: u64,
    /// Sampled flows not tracked because the chain's table was full.
    pub table_full: u64,
    /// Records over `--flow-log-rate`.
    pub rate_limited: u64,
    /// Records lost to a failed write.
    pub write_errors: u64,
}

#[derive(Debug)]
struct Source {
    xconn: String,
    a_is_source: bool,
    reader: FlowLogReader,
    /// Orphaned and emptied: retired after this pass.
    done: bool,
}

#[derive(Debug, Default)]
struct Shared {
    sources: Mutex<Vec<Source>>,
    /// Ring counters of readers already retired.
    retired: Mutex<FlowLogSnapshot>,
    written: AtomicU64,
    rate_limited: AtomicU64,
    write_errors: AtomicU64,
}

/// The forwarder's flow log: the writer thread and the chains' readers.
#[derive(Debug)]
pub struct FlowLog {
    config: FlowLogConfig,
    shared: Arc<Shared>,
}

static GLOBAL: OnceLock<FlowLog> = OnceLock::new();

/// The installed flow log, if `--flow-log` was given.
pub fn global() -> Option<&'static FlowLog> {
    GLOBAL.get()
}

/// Opens (appends to) the file and starts the writer thread; once per
/// process.
///
/// # Errors
/// The file cannot be opened, the thread cannot start, or a flow log is
/// already installed.
pub fn install(config: FlowLogConfig) -> std::io::Result<&'static FlowLog> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&config.path)?;
    let log = FlowLog {
        config,
        shared: Arc::default(),
    };
    let shared = log.shared.clone();
    let rate = log.config.rate;
    GLOBAL
        .set(log)
        .map_err(|_| std::io::Error::other("flow log already installed"))?;
    std::thread::Builder::new()
        .name("nsm-flowlog".into())
        .spawn(move || writer_loop(&shared, BufWriter::with_capacity(1 << 16, file), rate))?;
    Ok(GLOBAL.get().expect("set above"))
}

impl FlowLog {
    /// The spec chains are built with (sampling included).
    pub fn spec(&self) -> FlowLogSpec {
        FlowLogSpec {
            sample: self.config.sample.max(1),
            ..self.config.spec.clone()
        }
    }

    /// Starts draining a chain's records (`a_is_source`: the chain's side A
    /// is the connection's source, to name directions).
    pub fn register(&self, xconn: &str, a_is_source: bool, reader: FlowLogReader) {
        lock(&self.shared.sources).push(Source {
            xconn: xconn.to_string(),
            a_is_source,
            reader,
            done: false,
        });
    }

    /// Totals since start.
    pub fn stats(&self) -> FlowLogStats {
        let mut ring = *lock(&self.shared.retired);
        for s in lock(&self.shared.sources).iter() {
            let n = s.reader.snapshot();
            ring.ring_full += n.ring_full;
            ring.table_full += n.table_full;
        }
        FlowLogStats {
            written: self.shared.written.load(Ordering::Relaxed),
            ring_full: ring.ring_full,
            table_full: ring.table_full,
            rate_limited: self.shared.rate_limited.load(Ordering::Relaxed),
            write_errors: self.shared.write_errors.load(Ordering::Relaxed),
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the data is plain.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A token bucket of `rate` records a second, one second deep.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, now: Instant) -> Self {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn writer_loop(shared: &Shared, mut out: BufWriter<File>, rate: u32) {
    let mut bucket = Bucket::new(rate, Instant::now());
    let mut line = String::with_capacity(512);
    loop {
        std::thread::sleep(DRAIN_PERIOD);
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let mut sources = lock(&shared.sources);
        for s in sources.iter_mut() {
            // Seen orphaned before this pass: the chain's last records (its
            // drop flushes its flows) are all in the ring, and this pass
            // empties it. The fence pairs with the `Arc` drop's release.
            s.done = s.reader.is_orphan();
            std::sync::atomic::fence(Ordering::Acquire);
            while let Some(rec) = s.reader.pop() {
                if !bucket.take(Instant::now()) {
                    shared.rate_limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                line.clear();
                format_record(
                    &mut line,
                    &s.xconn,
                    s.a_is_source,
                    s.reader.names(),
                    &rec,
                    mono,
                    wall,
                );
                line.push('\n');
                if out.write_all(line.as_bytes()).is_ok() {
                    shared.written.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // A chain dropped after its last records were read: retire its reader.
        let mut retired = lock(&shared.retired);
        sources.retain(|s| {
            let done = s.done;
            if done {
                let n = s.reader.snapshot();
                retired.records += n.records;
                retired.ring_full += n.ring_full;
                retired.table_full += n.table_full;
            }
            !done
        });
        drop(retired);
        drop(sources);
        if out.flush().is_err() {
            shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn unix_ms(t: Instant, mono: Instant, wall: SystemTime) -> u64 {
    let at = if t <= mono {
        wall.checked_sub(mono - t)
    } else {
        wall.checked_add(t - mono)
    };
    at.and_then(|a| a.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Appends `rec` as one JSON object (no newline) to `out`; `mono`/`wall`
/// is one reading of both clocks, to date the record's `Instant`s.
pub fn format_record(
    out: &mut String,
    xconn: &str,
    a_is_source: bool,
    names: &[&'static str],
    rec: &FlowRecord,
    mono: Instant,
    wall: SystemTime,
) {
    use std::fmt::Write as _;
    let forward = (rec.direction == Direction::AToB) == a_is_source;
    let ip = |a: IpAddr| a.to_string();
    // serde_json escapes the one free-form string (the id).
    let id = serde_json::to_string(xconn).unwrap_or_else(|_| "\"\"".into());
    let _ = write!(
        out,
        r#"{{"connection":{id},"start_unix_ms":{},"end_unix_ms":{},"proto":{},"src":"{}","dst":"{}","src_port":{},"dst_port":{},"direction":"{}","orig_packets":{},"orig_bytes":{},"reply_packets":{},"reply_bytes":{},"functions":["#,
        unix_ms(rec.start, mono, wall),
        unix_ms(rec.end, mono, wall),
        rec.proto,
        ip(rec.src),
        ip(rec.dst),
        rec.src_port,
        rec.dst_port,
        if forward { "forward" } else { "reverse" },
        rec.forward.0,
        rec.forward.1,
        rec.reverse.0,
        rec.reverse.1,
    );
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"index":{i},"name":"{name}","verdict":"{}"}}"#,
            rec.verdict(i).as_str()
        );
    }
    out.push_str("],\"drop_reason\":");
    match rec.drop_reason {
        Some(r) => {
            let _ = write!(out, "\"{}\"", r.as_str());
        }
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\"end\":\"{}\"}}", rec.ended.as_str());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_to_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, t0);
        let n = (0..100).filter(|_| b.take(t0)).count();
        assert_eq!(n, 10, "one second's worth at once");
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(150)));
        let mut unlimited = Bucket::new(0, t0);
        assert!((0..1000).all(|_| unlimited.take(t0)));
    }

    #[test]
    fn unix_ms_maps_instants() {
        let mono = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(unix_ms(mono, mono, wall), 1_000_000);
        assert_eq!(
            unix_ms(mono - Duration::from_millis(250), mono, wall),
            999_750
        );
        assert_eq!(
            unix_ms(mono + Duration::from_millis(5), mono, wall),
            1_000_005
        );
    }
}
