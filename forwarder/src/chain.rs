//! Running a cross-connect's service chain: building it from a validated
//! [`ChainPlan`], draining its mirrors into pcap files, and reading its
//! counters for status.
//!
//! # Why here and not on the packet thread
//! Building allocates every table and ring the chain will use and opens
//! the mirror files; all of that happens on the gRPC side, so the packet
//! thread only swaps a finished [`Chain`] in with
//! [`nsm_dataplane::Dataplane::set_chain`] (one pointer move between two
//! batches) and hands the old one back to be dropped here, never paying
//! for a deallocation of a large flow table between packets.
//!
//! # Mirrors
//! A mirror stage copies packets into a lock-free ring; a `MirrorDrain`
//! thread per mirror empties it every [`DRAIN_PERIOD`] into a pcap file
//! (global header once, a record per copy), so a slow disk slows the
//! drain, never the packets: the ring fills and the stage counts
//! `ring_full`. Dropping the [`Installed`] chain stops its drains after one
//! last pass.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nsm_dataplane::stages::{
    self, AclHandle, CounterHandle, FaultHandle, FunctionSpec, MirrorHandle, MirrorReader,
    Nat44Handle, RateLimitDirSnapshot, RateLimitHandle, RateLimitSpec, StageHandle, pcap,
};
use nsm_dataplane::{Chain, Direction};
use nsm_proto::forwarder::v1 as pb;

use crate::plan::{ChainPlan, Refusal};
use crate::worker::PortDelay;

/// How often a mirror's ring is emptied into its file. At the default 512
/// slots this keeps up with about 50,000 mirrored packets a second.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(10);

/// Packets each direction's delay line holds. At 1,500 bytes that is 6 MB
/// a line, and 100 ms of about 500 Mbit/s; beyond it packets are dropped
/// and counted (`delay_overflow`), as by a full queue.
pub const DELAY_SLOTS: usize = 4096;
/// Bytes a delay slot holds beyond the MTU: a TAP's Ethernet header or
/// WireGuard's framing around an encrypted packet.
pub const DELAY_HEADROOM: usize = 128;

/// Packets each direction's shaper line holds: what the `ratelimit`
/// stages may queue ([`RateLimitSpec::QUEUE_PACKETS`]), plus room for the
/// packets a batch processes before the loop releases those due (the
/// stage counts a packet gone at its time, the line when it is sent).
/// Beyond it packets are dropped and counted (`queue_overflow`).
pub const SHAPE_SLOTS: usize = RateLimitSpec::QUEUE_PACKETS + 512;

/// One function's control-plane side, kept for status.
#[derive(Debug)]
enum Meter {
    Acl(AclHandle),
    RateLimit(RateLimitHandle),
    Nat44(Nat44Handle),
    Mirror(MirrorHandle, Arc<DrainCounters>),
    Counter(CounterHandle),
    Fault(FaultHandle),
}

/// What the forwarder keeps of the chain in force on one cross-connect.
#[derive(Debug)]
pub struct Installed {
    meters: Vec<Meter>,
    /// Stopped (after a last pass) when this is dropped.
    _drains: Vec<MirrorDrain>,
    a_is_source: bool,
    /// Added delay of side A's outputs (A to B) and of what goes to side A
    /// (B to A): the sum of the chain's `fault` delays.
    delay: (Duration, Duration),
    /// Delayed packets dropped (line full), shared with the packet thread.
    delay_overflow: Arc<AtomicU64>,
    /// Whether a `ratelimit` shapes side A's outputs (A to B) and what goes
    /// to side A (B to A): the port needs shaper lines for them.
    shaped: (bool, bool),
    /// Packets a shaper held that its line had no room for.
    queue_overflow: Arc<AtomicU64>,
}

/// Builds `plan`'s chain and opens its mirror files. Nothing touches the
/// data plane: the caller swaps the chain in.
///
/// # Errors
/// INVALID_ARGUMENT naming the element when a mirror file cannot be
/// created (the spec itself was validated when it was parsed).
pub fn build(plan: &ChainPlan, xconn: &str) -> Result<(Chain, Installed), Refusal> {
    // With `--flow-log`, the chain also keeps flow records for the writer.
    let flow_log = crate::flowlog::global();
    let (built, records) = stages::build_with_flow_log(
        &plan.spec,
        Instant::now(),
        flow_log.map(crate::flowlog::FlowLog::spec).as_ref(),
    )
    .map_err(|e| Refusal::invalid(e.to_string()))?;
    if let (Some(log), Some(r)) = (flow_log, records) {
        log.register(xconn, plan.a_is_source, r);
    }
    let mut meters = Vec::with_capacity(built.handles.len());
    let mut drains = Vec::new();
    for (i, h) in built.handles.into_iter().enumerate() {
        meters.push(match h {
            StageHandle::Acl(h) => Meter::Acl(h),
            StageHandle::RateLimit(h) => Meter::RateLimit(h),
            StageHandle::Nat44(h) => Meter::Nat44(h),
            StageHandle::Counter(h) => Meter::Counter(h),
            StageHandle::Fault(h) => Meter::Fault(h),
            StageHandle::Mirror(h, reader) => {
                let path = plan.pcap.get(i).cloned().flatten().ok_or_else(|| {
                    Refusal::invalid(format!("chain[{i}] (mirror): no pcap_path"))
                })?;
                let drain = MirrorDrain::start(&path, reader, xconn).map_err(|e| {
                    Refusal::invalid(format!(
                        "chain[{i}] (mirror): pcap_path {}: {e}",
                        path.display()
                    ))
                })?;
                let counters = drain.counters.clone();
                drains.push(drain);
                Meter::Mirror(h, counters)
            }
        });
    }
    let mut delay = (Duration::ZERO, Duration::ZERO);
    let mut shaped = (false, false);
    for e in &plan.spec.functions {
        match &e.function {
            FunctionSpec::Fault(fs) => {
                if fs.direction != Some(Direction::BToA) {
                    delay.0 += fs.delay;
                }
                if fs.direction != Some(Direction::AToB) {
                    delay.1 += fs.delay;
                }
            }
            FunctionSpec::RateLimit(r) => {
                shaped.0 |= r.direction != Some(Direction::BToA);
                shaped.1 |= r.direction != Some(Direction::AToB);
            }
            _ => {}
        }
    }
    Ok((
        built.chain,
        Installed {
            meters,
            _drains: drains,
            a_is_source: plan.a_is_source,
            delay,
            delay_overflow: Arc::new(AtomicU64::new(0)),
            shaped,
            queue_overflow: Arc::new(AtomicU64::new(0)),
        },
    ))
}

impl Installed {
    /// The delay and shaper lines for side A's port (empty without a
    /// delay or a `ratelimit`), for [`crate::worker::Core::set_delay`].
    /// Allocates every slot: call it off the packet thread.
    pub fn port_delay(&self, mtu: u32) -> PortDelay {
        let slot = usize::try_from(mtu)
            .unwrap_or(usize::MAX)
            .saturating_add(DELAY_HEADROOM);
        PortDelay::new(
            self.delay.0,
            self.delay.1,
            DELAY_SLOTS,
            slot,
            self.delay_overflow.clone(),
        )
        .with_shaper(
            self.shaped.0,
            self.shaped.1,
            SHAPE_SLOTS,
            slot,
            self.queue_overflow.clone(),
        )
    }

    /// Every function's counters, in chain order, directions named as in
    /// the proto (forward = source to destination).
    pub fn counters(&self) -> Vec<pb::FunctionCounters> {
        let fwd_rev = |ab: (u64, u64), ba: (u64, u64)| {
            if self.a_is_source { (ab, ba) } else { (ba, ab) }
        };
        self.meters
            .iter()
            .map(|m| {
                let (name, counters): (&str, Vec<(String, u64)>) = match m {
                    Meter::Acl(h) => {
                        let s = h.snapshot();
                        let mut c: Vec<(String, u64)> = s
                            .rule_hits
                            .iter()
                            .enumerate()
                            .map(|(i, n)| (format!("rule[{i}]"), *n))
                            .collect();
                        c.extend([
                            ("default".into(), s.default_hits),
                            ("allowed".into(), s.allowed),
                            ("denied".into(), s.denied),
                            ("tracked".into(), s.tracked),
                            ("conntrack_full".into(), s.conntrack_full),
                        ]);
                        ("acl", c)
                    }
                    Meter::RateLimit(h) => {
                        let s = h.snapshot();
                        let mut c = Vec::with_capacity(11);
                        let (f, r) = if self.a_is_source {
                            (s.a_to_b, s.b_to_a)
                        } else {
                            (s.b_to_a, s.a_to_b)
                        };
                        for (dir, d) in [("forward", f), ("reverse", r)] {
                            let RateLimitDirSnapshot {
                                passed_packets,
                                passed_bytes,
                                queued_packets,
                                dropped_packets,
                                dropped_bytes,
                            } = d;
                            c.extend([
                                (format!("{dir}_passed_packets"), passed_packets),
                                (format!("{dir}_passed_bytes"), passed_bytes),
                                (format!("{dir}_queued_packets"), queued_packets),
                                (format!("{dir}_dropped_packets"), dropped_packets),
                                (format!("{dir}_dropped_bytes"), dropped_bytes),
                            ]);
                        }
                        c.push((
                            "queue_overflow".into(),
                            self.queue_overflow.load(Ordering::Relaxed),
                        ));
                        ("ratelimit", c)
                    }
                    Meter::Nat44(h) => {
                        let s = h.snapshot();
                        (
                            "nat44",
                            vec![
                                ("translated_out".into(), s.translated_out),
                                ("translated_in".into(), s.translated_in),
                                ("mappings".into(), s.mappings),
                                ("exhausted".into(), s.exhausted),
                                ("no_mapping".into(), s.no_mapping),
                                ("untranslatable".into(), s.untranslatable),
                            ],
                        )
                    }
                    Meter::Mirror(h, d) => {
                        let s = h.snapshot();
                        (
                            "mirror",
                            vec![
                                ("matched".into(), s.matched),
                                ("copied".into(), s.copied),
                                ("ring_full".into(), s.ring_full),
                                ("truncated".into(), s.truncated),
                                ("written".into(), d.written.load(Ordering::Relaxed)),
                                (
                                    "write_errors".into(),
                                    d.write_errors.load(Ordering::Relaxed),
                                ),
                            ],
                        )
                    }
                    Meter::Counter(h) => {
                        let s = h.snapshot();
                        let ((fp, fb), (rp, rb)) = fwd_rev(
                            (s.a_to_b_packets, s.a_to_b_bytes),
                            (s.b_to_a_packets, s.b_to_a_bytes),
                        );
                        (
                            "counter",
                            vec![
                                ("forward_packets".into(), fp),
                                ("forward_bytes".into(), fb),
                                ("reverse_packets".into(), rp),
                                ("reverse_bytes".into(), rb),
                            ],
                        )
                    }
                    Meter::Fault(h) => {
                        let s = h.snapshot();
                        (
                            "fault",
                            vec![
                                ("seen".into(), s.seen),
                                ("dropped".into(), s.dropped),
                                ("corrupted".into(), s.corrupted),
                                ("corrupt_skipped".into(), s.corrupt_skipped),
                                (
                                    "delay_overflow".into(),
                                    self.delay_overflow.load(Ordering::Relaxed),
                                ),
                            ],
                        )
                    }
                };
                pb::FunctionCounters {
                    name: name.to_string(),
                    counters: counters.into_iter().collect(),
                }
            })
            .collect()
    }
}

/// What a drain did, for status.
#[derive(Debug, Default)]
struct DrainCounters {
    /// Records written to the file.
    written: AtomicU64,
    /// Records lost to a failed write (the drain stops writing after the
    /// first failure and only empties the ring).
    write_errors: AtomicU64,
}

/// A thread emptying one mirror ring into one pcap file.
#[derive(Debug)]
struct MirrorDrain {
    stop: Arc<AtomicBool>,
    counters: Arc<DrainCounters>,
    /// Not joined on drop: drop runs on the async runtime, and the thread
    /// ends by itself within a [`DRAIN_PERIOD`] after one last pass.
    _thread: JoinHandle<()>,
}

impl MirrorDrain {
    /// Creates (truncates) `path` with mode 0600, writes the pcap header,
    /// and starts the thread.
    fn start(path: &Path, reader: MirrorReader, xconn: &str) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // `mode` applies only when the file is created: an existing file
        // (e.g. a previous chain's capture) keeps its mode otherwise.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        let mut hdr = [0u8; pcap::GLOBAL_HEADER_LEN];
        let snaplen = u32::try_from(reader.snaplen()).unwrap_or(u32::MAX);
        if let Some(n) = pcap::global_header(&mut hdr, snaplen, pcap::LINKTYPE_RAW) {
            out.write_all(&hdr[..n])?;
        }
        out.flush()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DrainCounters::default());
        let (stop_t, counters_t) = (stop.clone(), counters.clone());
        let span = tracing::info_span!("mirror", xconn = %xconn, path = %path.display());
        let path: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("nsm-mirror".into())
            .spawn(move || {
                let _g = span.enter();
                drain_loop(reader, out, &stop_t, &counters_t);
                tracing::debug!(path = %path.display(), "mirror drain stopped");
            })?;
        Ok(MirrorDrain {
            stop,
            counters,
            _thread: thread,
        })
    }
}

impl Drop for MirrorDrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn drain_loop(
    mut reader: MirrorReader,
    mut out: BufWriter<File>,
    stop: &AtomicBool,
    counters: &DrainCounters,
) {
    let mut buf = vec![0u8; reader.snaplen()];
    let mut hdr = [0u8; pcap::RECORD_HEADER_LEN];
    let mut failed = false;
    loop {
        // Read the flag before the pass: copies made before the chain was
        // swapped out are all in the ring by then.
        let stopping = stop.load(Ordering::Acquire);
        let mut wrote = false;
        while let Some(rec) = reader.pop(&mut buf) {
            if failed {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // The ring stamps `Instant`s; pcap wants wall-clock time.
            let age = Instant::now().saturating_duration_since(rec.at);
            let ts = SystemTime::now()
                .checked_sub(age)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            let Some(n) = pcap::record_header(&mut hdr, ts, rec.len, rec.orig_len) else {
                continue;
            };
            let r = out
                .write_all(&hdr[..n])
                .and_then(|()| out.write_all(&buf[..rec.len]));
            match r {
                Ok(()) => {
                    counters.written.fetch_add(1, Ordering::Relaxed);
                    wrote = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "writing the mirror file failed; copies are discarded from now on");
                    counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    failed = true;
                }
            }
        }
        // Flushed per pass so that a reader of the file sees whole records
        // within a period.
        if wrote
            && !failed
            && let Err(e) = out.flush()
        {
            tracing::warn!(error = %e, "flushing the mirror file failed");
            failed = true;
        }
        if stopping {
            return;
        }
        std::thread::sleep(DRAIN_PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_chain;

    fn mirror_chain(path: &Path) -> pb::Chain {
        pb::Chain {
            functions: vec![
                pb::Function {
                    kind: Some(pb::function::Kind::Counter(pb::CounterFunction {})),
                    selector: None,
                },
                pb::Function {
                    kind: Some(pb::function::Kind::Mirror(pb::Mirror {
                        pcap_path: path.display().to_string(),
                        snaplen: 128,
                        ..Default::default()
                    })),
                    selector: None,
                },
            ],
        }
    }

    #[test]
    fn mirror_file_is_private_and_starts_with_a_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.pcap");
        let plan = parse_chain(Some(&mirror_chain(&path)), true).expect("valid");
        let (_chain, installed) = build(&plan, "x").expect("built");
        let meta = std::fs::metadata(&path).expect("created");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), pcap::GLOBAL_HEADER_LEN as u64);
        let c = installed.counters();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "counter");
        assert_eq!(c[1].name, "mirror");
        assert_eq!(c[1].counters.get("written"), Some(&0));
    }

    #[test]
    fn unwritable_mirror_path_names_the_element() {
        let plan = parse_chain(
            Some(&mirror_chain(Path::new("/nonexistent/dir/m.pcap"))),
            true,
        )
        .expect("valid");
        let e = build(&plan, "x").map(|_| ()).unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert!(
            e.message.starts_with("chain[1] (mirror): "),
            "{}",
            e.message
        );
    }
}
