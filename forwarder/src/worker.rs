//! A packet thread: owns a [`Dataplane`], the pod device fds of its
//! connections and its WireGuard UDP socket (or DPDK port), and moves
//! packets between them in batches.
//!
//! # Model
//! One thread per worker, each with one level-triggered epoll set over: an
//! eventfd (control messages), its own UDP socket, and each pod device of
//! the cross-connects it owns (the service shards them; see `service`).
//! Nothing else touches the worker's `Dataplane`, so it needs no lock: the
//! gRPC side sends a closure through a channel and writes the eventfd
//! (firecracker's `VmmAction` + `EventFd`), and the worker runs it between
//! two batches, which makes every reprogramming atomic with respect to
//! packets. WireGuard timers run from
//! the epoll timeout every [`TICK`].
//!
//! Within a worker, one thread for both directions, no hand-offs: the
//! REFERENCE measurements show thread wake-ups and copies, not the cipher,
//! limit userspace WireGuard, and boringtun doubled its throughput going
//! from 4 threads to 1. More connections use more cores; one connection
//! never pays for a cross-thread hand-off.
//!
//! # Per wake-up
//! - UDP readable: `recvmmsg` up to `batch` messages into fixed buffers.
//!   With UDP_GRO one message may hold a run of datagrams from one peer
//!   (typically one GSO send of the peer forwarder); each datagram goes
//!   through [`Dataplane::from_underlay`]. Decrypted packets go to their
//!   pod device, through `offload::Gro` for offloading TUNs, which joins
//!   consecutive TCP segments, or UDP datagrams, of a flow into one
//!   superpacket and one `writev`. Repeated at most `max_batches_per_wake`
//!   times so that one busy peer cannot starve the pods. A polled underlay
//!   (DPDK) has no fd: the loop polls it on every turn instead.
//! - Pod device readable: up to `batch` reads. An offloading TUN may return
//!   a 64 KB TCP superpacket, cut into MTU-sized segments in place
//!   (`offload::for_each_packet`); each packet goes through
//!   [`Dataplane::from_pod`], whose encryption writes straight into the
//!   next send slot (no copy). Same-node packets go to the other device.
//! - Then boringtun's released packets ([`Dataplane::poll_flush`]), the GRO
//!   superpacket, and one `sendmmsg` for everything queued, where runs of
//!   equal-sized datagrams to one peer become single UDP GSO messages.
//!
//! # Added delay (`fault`) and shaping (`ratelimit`)
//! A port with a [`PortDelay`] (the kernel side A of a cross-connect whose
//! chain has a `fault` delay or a `ratelimit`) holds its traffic in
//! [`DelayLine`]s: what the data plane produces from that pod's packets
//! (forward), and what it produces for that pod (reverse), is copied into
//! a line instead of being sent, and sent once due. A `fault` delay takes
//! every output of its direction, with a constant delay. A shaper takes
//! only the outputs the data plane says must wait
//! ([`Dataplane::hold_until`]), until the time it gives (plus the `fault`
//! delay, if any), in a line of its own so that traffic the shaper did not
//! queue (other flows, with a selector) does not wait behind it. The epoll
//! timeout is cut to the earliest due time, so release is driven by the
//! same loop. Delayed pod writes skip GRO (they leave one at a time
//! anyway).
//!
//! No allocation, lock or log line per packet: buffers are allocated once
//! here; I/O errors are counted and logged at most once per
//! [`IO_ERROR_LOG_INTERVAL`].

use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nsm_dataplane::stages::DelayLine;
use nsm_dataplane::{Action, Dataplane, PortId, PortKind};

use crate::offload;
use crate::sys::{self, SendBatch};
use crate::wire::{self, Rx};

/// How often WireGuard timers run (boringtun wants 100-250 ms).
pub const TICK: Duration = Duration::from_millis(100);
/// A polled underlay (DPDK: no fd to wait on) is polled again at once while
/// datagrams come, and at least this often when idle: the most latency an
/// idle path adds, for a thread that otherwise sleeps.
pub const IDLE_POLL: Duration = Duration::from_millis(1);
/// At most one I/O error log line per this interval.
pub const IO_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Largest packet or datagram handled: the IP maximum.
const MAX_PACKET: usize = 65535;
/// Send slots hold an encrypted packet of the largest MTU plus headroom.
const SEND_SLOT: usize = nsm_dataplane::out_len(u16::MAX);

const TOKEN_WAKE: u64 = 0;
const TOKEN_UDP: u64 = 1;
const TOKEN_PORT_BASE: u64 = 2;

/// Sizing of the packet thread.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Datagrams per `recvmmsg`/`sendmmsg`, and reads per device per wake.
    pub batch: usize,
    /// `recvmmsg` rounds per UDP wake-up before other fds get their turn.
    pub max_batches_per_wake: usize,
    /// Group same-destination datagrams into UDP GSO sends.
    pub udp_gso: bool,
    /// Coalesce TCP segments written to offloading TUNs.
    pub tun_gro: bool,
    /// Largest UDP payload that crosses the underlay unfragmented (underlay
    /// MTU minus IP and UDP headers): bigger datagrams are sent one by one.
    pub max_udp_payload: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch: 64,
            max_batches_per_wake: 4,
            udp_gso: true,
            tun_gro: true,
            max_udp_payload: 1472,
        }
    }
}

/// Counters of the worker's own I/O (the data plane counts packets).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Writes to pod devices that failed.
    pub pod_write_errors: AtomicU64,
    /// Datagrams the UDP socket refused.
    pub udp_send_errors: AtomicU64,
    /// Failed reads (devices or socket).
    pub read_errors: AtomicU64,
    /// Offloaded TUN reads that could not be segmented.
    pub offload_errors: AtomicU64,
}

/// A reading of [`IoCounters`], or their sum over packet threads.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoTotals {
    /// Writes to pod devices that failed.
    pub pod_write_errors: u64,
    /// Datagrams the UDP socket (or DPDK port) refused.
    pub udp_send_errors: u64,
    /// Failed reads (devices or socket).
    pub read_errors: u64,
    /// Offloaded TUN reads that could not be segmented.
    pub offload_errors: u64,
}

impl IoCounters {
    /// The counts now.
    pub fn snapshot(&self) -> IoTotals {
        IoTotals {
            pod_write_errors: self.pod_write_errors.load(Ordering::Relaxed),
            udp_send_errors: self.udp_send_errors.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            offload_errors: self.offload_errors.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Add for IoTotals {
    type Output = IoTotals;
    fn add(self, o: IoTotals) -> IoTotals {
        IoTotals {
            pod_write_errors: self.pod_write_errors + o.pod_write_errors,
            udp_send_errors: self.udp_send_errors + o.udp_send_errors,
            read_errors: self.read_errors + o.read_errors,
            offload_errors: self.offload_errors + o.offload_errors,
        }
    }
}

/// What the control side runs on the packet thread.
type Cmd = Box<dyn FnOnce(&mut Core) + Send>;

/// Where a delayed output goes once due.
#[derive(Debug, Clone, Copy)]
enum Dest {
    Pod(PortId),
    Udp(std::net::SocketAddr),
}

/// The added delay and the shaper queues of one pod port, built off the
/// packet thread (the lines allocate every slot) and installed with
/// [`Core::set_delay`].
#[derive(Debug)]
pub struct PortDelay {
    /// Outputs made from this pod's packets (`fault` delay).
    forward: Option<DelayLine<Dest>>,
    /// Outputs bound for this pod (`fault` delay).
    reverse: Option<DelayLine<Dest>>,
    /// Outputs made from this pod's packets that a shaper holds.
    shape_forward: Option<DelayLine<Dest>>,
    /// Outputs bound for this pod that a shaper holds.
    shape_reverse: Option<DelayLine<Dest>>,
    /// Outputs dropped because a delay line was full or a packet too big.
    overflow: Arc<AtomicU64>,
    /// The same for the shaper lines.
    shape_overflow: Arc<AtomicU64>,
}

impl PortDelay {
    /// Lines of `slots` packets of up to `slot_size` bytes each, for the
    /// nonzero delays; `overflow` counts what did not fit.
    pub fn new(
        forward: Duration,
        reverse: Duration,
        slots: usize,
        slot_size: usize,
        overflow: Arc<AtomicU64>,
    ) -> Self {
        let line = |d: Duration| (!d.is_zero()).then(|| DelayLine::new(d, slots, slot_size));
        PortDelay {
            forward: line(forward),
            reverse: line(reverse),
            shape_forward: None,
            shape_reverse: None,
            overflow,
            shape_overflow: Arc::default(),
        }
    }

    /// Adds shaper lines (`slots` packets of up to `slot_size` bytes) for
    /// the directions that have a shaper; `overflow` counts what did not
    /// fit.
    pub fn with_shaper(
        mut self,
        forward: bool,
        reverse: bool,
        slots: usize,
        slot_size: usize,
        overflow: Arc<AtomicU64>,
    ) -> Self {
        let line = |on: bool| on.then(|| DelayLine::new(Duration::ZERO, slots, slot_size));
        self.shape_forward = line(forward);
        self.shape_reverse = line(reverse);
        self.shape_overflow = overflow;
        self
    }

    /// No delay (what removes one with [`Core::set_delay`]).
    pub fn none() -> Self {
        PortDelay {
            forward: None,
            reverse: None,
            shape_forward: None,
            shape_reverse: None,
            overflow: Arc::default(),
            shape_overflow: Arc::default(),
        }
    }

    /// No line: nothing to delay.
    pub fn is_empty(&self) -> bool {
        self.lines().next().is_none()
    }

    fn lines(&self) -> impl Iterator<Item = &DelayLine<Dest>> {
        [
            &self.forward,
            &self.reverse,
            &self.shape_forward,
            &self.shape_reverse,
        ]
        .into_iter()
        .flatten()
    }

    fn next_due(&self) -> Option<Instant> {
        self.lines().filter_map(DelayLine::next_due).min()
    }

    /// Takes over the packets `old`'s shaper lines still hold, so that a
    /// chain swap (a new rate) does not drop what was queued. Only into
    /// empty lines of the same slot size; O(1).
    fn inherit_queues(&mut self, old: &mut PortDelay) {
        for (new, old) in [
            (&mut self.shape_forward, &mut old.shape_forward),
            (&mut self.shape_reverse, &mut old.shape_reverse),
        ] {
            if let (Some(n), Some(o)) = (new.as_mut(), old.as_mut())
                && n.is_empty()
                && !o.is_empty()
                && n.slot_size() == o.slot_size()
            {
                std::mem::swap(n, o);
            }
        }
    }

    /// Queues `action`'s output if it must wait: held by a shaper until
    /// `hold` (plus the `fault` delay), or delayed by `fault`. Returns what
    /// is left to carry out now ([`Action::Done`] when it was queued).
    fn take<'a>(
        &mut self,
        forward: bool,
        now: Instant,
        hold: Option<Instant>,
        action: Action<'a>,
    ) -> Action<'a> {
        if matches!(action, Action::Drop(_) | Action::Done) {
            return action;
        }
        let PortDelay {
            forward: fwd,
            reverse: rev,
            shape_forward,
            shape_reverse,
            overflow,
            shape_overflow,
        } = self;
        let (line, shape) = if forward {
            (fwd, shape_forward)
        } else {
            (rev, shape_reverse)
        };
        let extra = line.as_ref().map_or(Duration::ZERO, DelayLine::delay);
        match (hold, shape.as_mut(), line.as_mut()) {
            (Some(t), Some(s), _) => queue_action(s, shape_overflow, t + extra, action),
            (_, _, Some(l)) => queue_action(l, overflow, now + extra, action),
            _ => action,
        }
    }
}

/// Queues `action`'s output in `line`, due at `due`, instead of sending it.
fn queue_action<'a>(
    line: &mut DelayLine<Dest>,
    overflow: &AtomicU64,
    due: Instant,
    action: Action<'a>,
) -> Action<'a> {
    let (bytes, dest): (&[u8], Dest) = match &action {
        Action::ToUnderlay { dst, datagram } => (&datagram[..], Dest::Udp(*dst)),
        Action::ToPod { port, packet } => (&packet[..], Dest::Pod(*port)),
        Action::Drop(_) | Action::Done => return action,
    };
    if line.push_at(due, bytes, dest).is_err() {
        overflow.fetch_add(1, Ordering::Relaxed);
    }
    Action::Done
}

/// A pod device as the loop sees it.
#[derive(Debug)]
struct Port {
    file: File,
    /// Reads and writes carry a `virtio_net_hdr` (see `offload`).
    offload: bool,
}

/// The state a control closure may touch, on the packet thread.
#[derive(Debug)]
pub struct Core {
    /// The packet core (owned here, never shared).
    pub dp: Dataplane,
    ports: Vec<Option<Port>>,
    epoll: Epoll,
    /// Datagrams a control command produced (a first handshake), sent by
    /// the loop right after the command.
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    /// Ports whose device failed (e.g. its namespace was deleted): out of
    /// the epoll set so a dead fd cannot spin the loop, kept until the
    /// control side removes them.
    dead: Vec<PortId>,
    /// Ports with an added delay; few, so a `Vec` searched linearly.
    delays: Vec<(PortId, PortDelay)>,
    stop: bool,
}

impl Core {
    /// Registers pod device `fd` as `id` in the data plane and the epoll
    /// set. On error, `fd` is dropped (which deletes the device).
    ///
    /// # Errors
    /// The data plane's refusal, or an epoll error, as text.
    /// `offload` says the device was opened with `IFF_VNET_HDR` offloads.
    pub fn add_port(
        &mut self,
        id: PortId,
        kind: PortKind,
        fd: OwnedFd,
        offload: bool,
    ) -> Result<(), String> {
        self.dp.add_port(id, kind).map_err(|e| e.to_string())?;
        let token = TOKEN_PORT_BASE + u64::from(id.0);
        if let Err(e) = self
            .epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            let _ = self.dp.remove_port(id);
            return Err(format!("epoll add: {e}"));
        }
        let i = id.0 as usize;
        if self.ports.len() <= i {
            self.ports.resize_with(i + 1, || None);
        }
        self.ports[i] = Some(Port {
            file: File::from(fd),
            offload,
        });
        Ok(())
    }

    /// Forgets pod device `id` and hands back its fd, which the caller must
    /// close *off the packet thread* ([`close_devices`]): closing the last
    /// fd of a TUN/TAP deletes the device, and the kernel waits out RCU
    /// grace periods inside that close(2), 15 to 20 ms here, which on this
    /// thread would stall every other connection it carries. Its
    /// cross-connect must have been removed first.
    #[must_use = "the fd must be closed off the packet thread (close_devices)"]
    pub fn remove_port(&mut self, id: PortId) -> Option<OwnedFd> {
        let _ = self.dp.remove_port(id);
        self.delays.retain(|(p, _)| *p != id);
        self.dead.retain(|p| *p != id);
        let port = self.ports.get_mut(id.0 as usize).and_then(Option::take)?;
        let _ = self.epoll.delete(&port.file);
        Some(OwnedFd::from(port.file))
    }

    /// Installs (or with an empty one, removes) the added delay of pod
    /// port `id`; returns the one it replaces, to be dropped by the caller
    /// (off the packet thread). Packets its shaper lines hold move to the
    /// new shaper lines, if there are any; the rest are discarded.
    pub fn set_delay(&mut self, id: PortId, mut delay: PortDelay) -> Option<PortDelay> {
        let mut old = self
            .delays
            .iter()
            .position(|(p, _)| *p == id)
            .map(|i| self.delays.swap_remove(i).1);
        if let Some(old) = old.as_mut() {
            delay.inherit_queues(old);
        }
        if !delay.is_empty() {
            self.delays.push((id, delay));
        }
        old
    }

    /// True when port `id`'s device failed and was taken out of the loop.
    pub fn is_dead(&self, id: PortId) -> bool {
        self.dead.contains(&id)
    }

    fn mark_dead(&mut self, id: PortId) {
        if let Some(Some(port)) = self.ports.get(id.0 as usize) {
            let _ = self.epoll.delete(&port.file);
        }
        if !self.dead.contains(&id) {
            self.dead.push(id);
        }
    }

    /// Starts the WireGuard handshake of `id` now rather than on its first
    /// packet, so the session is up by the time traffic flows.
    pub fn initiate_handshake(&mut self, id: &str) {
        let mut buf = [0u8; 256];
        if let Action::ToUnderlay { dst, datagram } = self.dp.initiate_handshake(id, &mut buf) {
            // Control path, not per packet: allocating is fine.
            self.outbox.push((dst, datagram.to_vec()));
        }
    }

    /// Asks the loop to exit after this command.
    pub fn stop(&mut self) {
        self.stop = true;
    }
}

/// The worker thread is gone (it panicked or was stopped).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the packet thread is not running")]
pub struct WorkerGone;

/// Sends commands to the packet thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<EventFd>,
    /// The worker's own I/O error counts.
    pub io: Arc<IoCounters>,
}

impl WorkerHandle {
    /// Runs `f` on the packet thread between two batches and returns its
    /// result.
    ///
    /// # Errors
    /// [`WorkerGone`] when the thread is not running.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> R + Send + 'static,
    ) -> Result<R, WorkerGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |core: &mut Core| {
                let _ = tx.send(f(core));
            }))
            .map_err(|_| WorkerGone)?;
        self.wake.write(1).map_err(|_| WorkerGone)?;
        rx.await.map_err(|_| WorkerGone)
    }

    /// Asks the thread to exit (dropping every device fd).
    pub fn stop(&self) {
        if self.tx.send(Box::new(Core::stop)).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

/// Closes pod device fds handed back by [`Core::remove_port`], on a
/// blocking-pool thread, and returns once they are closed (so the devices
/// and their names are gone, as after a synchronous close). Neither a packet
/// thread nor a runtime worker waits out the kernel's device deletion.
pub async fn close_devices(fds: Vec<OwnedFd>) {
    if fds.is_empty() {
        return;
    }
    // A failed spawn or a panicking close cannot leak the fds: they are
    // closed with the task (or on unwind) either way.
    let _ = tokio::task::spawn_blocking(move || drop(fds)).await;
}

/// The underlay of one packet thread: the kernel's UDP socket, or a DPDK
/// port (feature `dpdk`).
#[derive(Debug)]
pub enum Underlay {
    /// A bound UDP socket.
    Kernel(std::net::UdpSocket),
    /// A UDP endpoint on a DPDK port.
    #[cfg(feature = "dpdk")]
    Dpdk(Box<nsm_dpdk::UdpUnderlay>),
}

impl Underlay {
    fn into_wire(self, config: &WorkerConfig) -> wire::Tx {
        match self {
            Underlay::Kernel(udp) => {
                let mut send = SendBatch::new(config.batch, SEND_SLOT);
                if !config.udp_gso {
                    send.disable_gso();
                }
                send.set_gso_max_segment(config.max_udp_payload);
                wire::Tx::kernel(udp, send)
            }
            #[cfg(feature = "dpdk")]
            Underlay::Dpdk(dev) => wire::Tx::dpdk(dev, SEND_SLOT),
        }
    }
}

/// Starts packet thread number `index` (its name: `nsm-packet-INDEX`)
/// over `underlay`.
///
/// # Errors
/// When epoll or the eventfd cannot be created or the thread not spawned.
pub fn spawn(
    index: usize,
    dp: Dataplane,
    underlay: Underlay,
    config: WorkerConfig,
) -> std::io::Result<(WorkerHandle, std::thread::JoinHandle<()>)> {
    let batch = config.batch.clamp(1, 1024);
    let config = WorkerConfig { batch, ..config };
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let wake = Arc::new(EventFd::from_flags(
        EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
    )?);
    epoll.add(
        wake.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE),
    )?;
    // A polled underlay (DPDK) has no fd: the loop polls it.
    #[cfg_attr(not(feature = "dpdk"), allow(irrefutable_let_patterns))]
    if let Underlay::Kernel(udp) = &underlay {
        epoll.add(udp.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP))?;
    }
    let (tx, rx) = mpsc::channel();
    let io = Arc::new(IoCounters::default());
    let handle = WorkerHandle {
        tx,
        wake: wake.clone(),
        io: io.clone(),
    };
    let core = Core {
        dp,
        ports: Vec::new(),
        epoll,
        outbox: Vec::new(),
        dead: Vec::new(),
        delays: Vec::new(),
        stop: false,
    };
    let join = std::thread::Builder::new()
        .name(format!("nsm-packet-{index}"))
        .spawn(move || {
            // Built here: the batches hold raw pointers and never leave
            // this thread.
            let wire = underlay.into_wire(&config);
            let mut w = Worker::new(core, wire, wake, rx, config, io);
            w.run();
        })?;
    Ok((handle, join))
}

struct Worker {
    core: Core,
    wake: Arc<EventFd>,
    rx: mpsc::Receiver<Cmd>,
    config: WorkerConfig,
    recv: Rx,
    out: Out,
    /// One pod packet (or TCP superpacket) at a time is read here.
    pkt: Vec<u8>,
    /// Scratch for what cannot be cut in place (see `offload`), and for
    /// delayed packets on their way out.
    seg: Vec<u8>,
    /// Coalesces TCP segments bound for offloading TUNs; `None` when
    /// disabled.
    gro: Option<offload::Gro>,
}

/// The sending half: the underlay's sending side and error accounting,
/// kept apart from the receive batch so both can be borrowed at once.
struct Out {
    wire: wire::Tx,
    io: Arc<IoCounters>,
    last_error_log: Option<Instant>,
    failed: wire::Failed,
}

impl Out {
    /// Queues the `len` bytes at `off` of the last slot for `dst`.
    fn commit(&mut self, off: usize, len: usize, dst: SocketAddr) {
        self.wire.commit(off, len, dst, &mut self.failed);
    }

    fn flush(&mut self) {
        self.wire.flush(&mut self.failed);
        if self.failed.count > 0 {
            let f = std::mem::take(&mut self.failed);
            self.io
                .udp_send_errors
                .fetch_add(f.count as u64, Ordering::Relaxed);
            if let Some(e) = &f.last_error {
                self.note_error("UDP send failed", e);
            }
        }
    }

    fn note_error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last_error_log
            .is_none_or(|t| now.duration_since(t) >= IO_ERROR_LOG_INTERVAL)
        {
            self.last_error_log = Some(now);
            tracing::warn!(error = %e, "{what} (more errors within {IO_ERROR_LOG_INTERVAL:?} are only counted)");
        }
    }
}

impl Worker {
    fn new(
        core: Core,
        wire: wire::Tx,
        wake: Arc<EventFd>,
        rx: mpsc::Receiver<Cmd>,
        config: WorkerConfig,
        io: Arc<IoCounters>,
    ) -> Self {
        Worker {
            core,
            wake,
            rx,
            config,
            recv: Rx::for_tx(&wire, config.batch, MAX_PACKET),
            out: Out {
                wire,
                io,
                last_error_log: None,
                failed: wire::Failed::default(),
            },
            pkt: vec![0; MAX_PACKET + offload::VNET_HDR_LEN],
            seg: vec![0; MAX_PACKET],
            gro: config.tun_gro.then(offload::Gro::new),
        }
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut next_tick = Instant::now() + TICK;
        let polled = self.out.wire.fd().is_none();
        // Whether the last poll of a polled underlay found datagrams.
        let mut busy = false;
        tracing::debug!(polled, "packet thread running");
        while !self.core.stop {
            let now = Instant::now();
            // Wake for the earliest delayed packet too (rounded up, so
            // it is due when we wake).
            let wake_at = self
                .core
                .delays
                .iter()
                .filter_map(|(_, d)| d.next_due())
                .min()
                .map_or(next_tick, |d| d.min(next_tick));
            let until = wake_at.saturating_duration_since(now);
            let timeout_ms = until.as_millis() + u128::from(until.subsec_nanos() % 1_000_000 != 0);
            let mut timeout = u16::try_from(timeout_ms).unwrap_or(u16::MAX);
            if polled {
                let idle = u16::try_from(IDLE_POLL.as_millis()).unwrap_or(1);
                timeout = if busy { 0 } else { timeout.min(idle) };
            }
            let n = match self.core.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait failed; packet thread exits");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => self.control(),
                    TOKEN_UDP => {
                        self.on_underlay();
                    }
                    t => {
                        if let Ok(id) = u32::try_from(t - TOKEN_PORT_BASE) {
                            self.on_pod(PortId(id));
                        }
                    }
                }
            }
            if polled {
                busy = self.on_underlay() > 0;
            }
            let now = Instant::now();
            if !self.core.delays.is_empty() {
                self.release_due(now);
            }
            if now >= next_tick {
                self.timers(now);
                next_tick = now + TICK;
            }
        }
        let io = &self.out.io;
        tracing::info!(
            pod_write_errors = io.pod_write_errors.load(Ordering::Relaxed),
            udp_send_errors = io.udp_send_errors.load(Ordering::Relaxed),
            read_errors = io.read_errors.load(Ordering::Relaxed),
            offload_errors = io.offload_errors.load(Ordering::Relaxed),
            "packet thread stopped"
        );
    }

    /// Runs every pending control command.
    fn control(&mut self) {
        let _ = self.wake.read();
        while let Ok(cmd) = self.rx.try_recv() {
            cmd(&mut self.core);
            for (dst, datagram) in self.core.outbox.drain(..) {
                if let Err(e) = self.out.wire.send_now(dst, &datagram) {
                    tracing::debug!(%dst, error = %e, "sending a first handshake failed");
                }
            }
        }
        // The commands may have produced nothing to send, but a removed
        // port may have had queued datagrams: send them now.
        self.out.flush();
    }

    /// Reads and handles what the underlay holds; returns the number of
    /// messages.
    fn on_underlay(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..self.config.max_batches_per_wake {
            let n = match self.recv.fill(&mut self.out.wire) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    self.out.io.read_errors.fetch_add(1, Ordering::Relaxed);
                    self.out.note_error("UDP receive failed", &e);
                    break;
                }
            };
            let now = Instant::now();
            for i in 0..n {
                let Some((src, data, size)) = self.recv.message(i) else {
                    continue;
                };
                // A GRO message holds several datagrams of `size` bytes.
                for datagram in data.chunks(size) {
                    let slot = self.out.wire.slot(&mut self.out.failed);
                    let base = slot.as_ptr() as usize;
                    let action = self.core.dp.from_underlay(now, src, datagram, slot);
                    let hold = self.core.dp.hold_until();
                    let action = delay_reverse(&mut self.core.delays, now, hold, action);
                    if let Some((off, len, dst)) =
                        handle_action(action, base, &self.core.ports, &mut self.gro, &self.out.io)
                    {
                        self.out.commit(off, len, dst);
                    }
                }
            }
            total += n;
            self.drain_flush(now);
            self.flush_gro();
            self.out.flush();
            if n < self.config.batch {
                break;
            }
        }
        total
    }

    fn on_pod(&mut self, port: PortId) {
        let now = Instant::now();
        for _ in 0..self.config.batch {
            let Some(Some(p)) = self.core.ports.get(port.0 as usize) else {
                return;
            };
            let offload = p.offload;
            let n = match sys::read_packet(p.file.as_fd(), &mut self.pkt) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    // EBADFD/EIO when the device went away under us: stop
                    // polling it, report it DOWN, and let the manager
                    // remove it.
                    self.out.io.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%port, error = %e, "pod device failed; taken out of the loop");
                    self.core.mark_dead(port);
                    break;
                }
            };
            let Worker {
                core,
                out,
                pkt,
                seg,
                gro,
                ..
            } = self;
            let mut one = |packet: &mut [u8]| {
                let slot = out.wire.slot(&mut out.failed);
                let base = slot.as_ptr() as usize;
                let action = core.dp.from_pod(now, port, packet, slot);
                let hold = core.dp.hold_until();
                let mut action = delay_reverse(&mut core.delays, now, hold, action);
                if let Some((_, d)) = core.delays.iter_mut().find(|(p, _)| *p == port) {
                    action = d.take(true, now, hold, action);
                }
                if let Some((off, len, dst)) =
                    handle_action(action, base, &core.ports, gro, &out.io)
                {
                    out.commit(off, len, dst);
                }
            };
            if offload {
                // One read may be a TCP superpacket: cut it into segments.
                if offload::for_each_packet(&mut pkt[..n], seg, &mut one).is_err() {
                    out.io.offload_errors.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                one(&mut pkt[..n]);
            }
        }
        self.drain_flush(now);
        self.flush_gro();
        self.out.flush();
    }

    /// Sends every delayed output that is due.
    fn release_due(&mut self, now: Instant) {
        let Worker { core, out, seg, .. } = self;
        for (_, d) in &mut core.delays {
            let lines = [
                &mut d.forward,
                &mut d.reverse,
                &mut d.shape_forward,
                &mut d.shape_reverse,
            ];
            for line in lines.into_iter().flatten() {
                while let Some((len, dest)) = line.pop_due(now, seg) {
                    let bytes = &seg[..len];
                    match dest {
                        Dest::Pod(p) => {
                            write_port(&core.ports, &out.io, p.0, &offload::WRITE_HDR, bytes);
                        }
                        Dest::Udp(dst) => {
                            let slot = out.wire.slot(&mut out.failed);
                            if let Some(s) = slot.get_mut(..len) {
                                s.copy_from_slice(bytes);
                                out.commit(0, len, dst);
                            }
                        }
                    }
                }
            }
        }
        out.flush();
    }

    /// Writes the superpacket GRO holds, if any.
    fn flush_gro(&mut self) {
        let Worker { core, out, gro, .. } = self;
        if let Some(g) = gro {
            g.flush(&mut |pt, h, pk| write_port(&core.ports, &out.io, pt, h, pk));
        }
    }

    /// Sends what boringtun released (packets held for a handshake).
    fn drain_flush(&mut self, now: Instant) {
        while self.core.dp.has_pending_flush() {
            let slot = self.out.wire.slot(&mut self.out.failed);
            let base = slot.as_ptr() as usize;
            let action = self.core.dp.poll_flush(now, slot);
            if matches!(action, Action::Done | Action::Drop(_)) {
                break;
            }
            if let Some((off, len, dst)) =
                handle_action(action, base, &self.core.ports, &mut self.gro, &self.out.io)
            {
                self.out.commit(off, len, dst);
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        self.core.dp.poll_chains(now);
        loop {
            let slot = self.out.wire.slot(&mut self.out.failed);
            let base = slot.as_ptr() as usize;
            let action = self.core.dp.poll_timers(now, slot);
            if matches!(action, Action::Done | Action::Drop(_)) {
                break;
            }
            if let Some((off, len, dst)) =
                handle_action(action, base, &self.core.ports, &mut self.gro, &self.out.io)
            {
                self.out.commit(off, len, dst);
            }
        }
        self.flush_gro();
        self.out.flush();
    }
}

/// Holds a pod-bound output in its port's reverse lines, if it has them
/// and the output must wait (`hold`: a shaper's time); returns what is
/// left to carry out.
fn delay_reverse<'a>(
    delays: &mut [(PortId, PortDelay)],
    now: Instant,
    hold: Option<Instant>,
    action: Action<'a>,
) -> Action<'a> {
    if delays.is_empty() {
        return action;
    }
    if let Action::ToPod { port, .. } = &action
        && let Some((_, d)) = delays.iter_mut().find(|(p, _)| p == port)
    {
        return d.take(false, now, hold, action);
    }
    action
}

/// Carries out one data-plane action. A pod-bound packet is written at
/// once (or, for an offloading TUN, handed to `gro`, which may hold it until
/// the end of the batch); a datagram stays in the send slot it was written
/// to, and its `(offset in the slot, length, destination)` is returned for
/// queueing.
fn handle_action(
    action: Action<'_>,
    slot_base: usize,
    ports: &[Option<Port>],
    gro: &mut Option<offload::Gro>,
    io: &IoCounters,
) -> Option<(usize, usize, std::net::SocketAddr)> {
    match action {
        Action::ToUnderlay { dst, datagram } => {
            let off = (datagram.as_ptr() as usize).wrapping_sub(slot_base);
            Some((off, datagram.len(), dst))
        }
        Action::ToPod { port, packet } => {
            let offload = ports
                .get(port.0 as usize)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.offload);
            match gro {
                Some(g) if offload => g.push(port.0, packet, &mut |pt, h, pk| {
                    write_port(ports, io, pt, h, pk);
                }),
                _ => write_port(ports, io, port.0, &offload::WRITE_HDR, packet),
            }
            None
        }
        Action::Drop(_) | Action::Done => None,
    }
}

/// Writes one packet to a pod device: with its `virtio_net_hdr` in front
/// (one `writev`) for an offloading TUN, bare otherwise.
fn write_port(ports: &[Option<Port>], io: &IoCounters, port: u32, hdr: &[u8], pkt: &[u8]) {
    let Some(Some(p)) = ports.get(port as usize) else {
        return;
    };
    let r = if p.offload {
        (&p.file).write_vectored(&[IoSlice::new(hdr), IoSlice::new(pkt)])
    } else {
        (&p.file).write(pkt)
    };
    if r.is_err() {
        io.pod_write_errors.fetch_add(1, Ordering::Relaxed);
    }
}
