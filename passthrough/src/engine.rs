//! The packet mover: copies every packet the kernel *receives* on one
//! interface to the other, in both directions, with AF_PACKET sockets.
//!
//! # Why AF_PACKET, and why this way
//! The forwarder creates the passthrough's interfaces and holds their TUN or
//! TAP file descriptors itself; all this process has is two interface names
//! in its own namespace. A `SOCK_RAW` packet socket bound to each interface
//! sees what arrives there (raw IP on a TUN, `ARPHRD_NONE`; Ethernet frames
//! on a TAP) and can transmit on it, which is exactly "receive on one side,
//! send on the other", whatever the payload.
//!
//! - **Only received packets.** A packet socket also sees the copies of the
//!   packets transmitted on its interface (`PACKET_OUTGOING`), including our
//!   own: forwarding those would loop. `PACKET_IGNORE_OUTGOING` (Linux 4.20)
//!   asks the kernel not to queue them, and every packet's `sll_pkttype` is
//!   checked anyway.
//! - **Superpackets.** The forwarder enables virtio-net offloads on its TUN
//!   devices, and veth/TAP do GSO/GRO, so the kernel may hand over a TCP
//!   superpacket of up to 64 KiB (bigger than the MTU) whose checksum is not
//!   yet computed. With `PACKET_VNET_HDR` on both sockets each packet comes
//!   with its `virtio_net_hdr` (GSO type and size, checksum start and
//!   offset), and transmitting it with the same header makes the kernel
//!   rebuild the same GSO packet on the other interface: it is segmented
//!   (or its checksum completed) by the device or in software, as for any
//!   local packet. Without it, superpackets would be refused as too big
//!   (`EMSGSIZE`) and TCP would stall.
//! - **No allocation per packet.** Each link owns one receive buffer,
//!   allocated when it starts; a packet is received into it and sent from
//!   it. A wake-up drains at most [`BATCH`] packets per direction so that
//!   one busy direction cannot starve the other.
//! - **One thread per connection.** Blocking `poll` on the two sockets and
//!   an eventfd that stops it: no busy loop, an immediate stop, and no
//!   coordination between connections.
//! - **Interfaces that come and go.** The incoming interface appears only
//!   after the passthrough has replied (the manager programs the forwarder
//!   afterwards), and healing may recreate either. The link waits for both
//!   names, and rebinds when a socket reports its device gone.
//!
//! Counters are atomics with a single writer (the link's thread), read at
//! any time by the stats writer.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Size of the `virtio_net_hdr` in front of each packet (no `num_buffers`),
/// the default of `PACKET_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// Receive buffer: a header and the largest GSO packet (64 KiB plus link
/// headers), with room to spare. A packet that does not fit is dropped.
const BUF_LEN: usize = VNET_HDR_LEN + 128 * 1024;
/// Packets drained per direction per wake-up.
pub const BATCH: usize = 64;
/// Socket receive buffer asked for (the kernel may clamp it).
const RCVBUF: libc::c_int = 4 << 20;
/// How often to look for interfaces that do not exist yet: every 10 ms for
/// the first [`EAGER`] (the incoming one normally appears within
/// milliseconds of our reply, and packets before we bind are lost), then
/// every 100 ms, and every second once the appearance timeout has passed.
/// Each look is one `if_nametoindex` per name.
const POLL_EAGER: Duration = Duration::from_millis(10);
const EAGER: Duration = Duration::from_secs(2);
const POLL_FAST: Duration = Duration::from_millis(100);
const POLL_SLOW: Duration = Duration::from_secs(1);
/// Minimum interval between two log lines about drops.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Packets and bytes moved in one direction.
#[derive(Debug, Default)]
pub struct DirCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl DirCounters {
    /// Packets moved (a GSO superpacket counts once).
    pub fn packets(&self) -> u64 {
        self.packets.load(Ordering::Relaxed)
    }

    /// Bytes moved: the IP packets (TUN) or Ethernet frames (TAP), without
    /// the `virtio_net_hdr`.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Single writer (the link's thread): a load and a store, no locked
    /// read-modify-write.
    fn add(&self, bytes: usize) {
        self.packets
            .store(self.packets.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.bytes.store(
            self.bytes.load(Ordering::Relaxed) + bytes as u64,
            Ordering::Relaxed,
        );
    }
}

/// What a [`Link`] counted.
#[derive(Debug, Default)]
pub struct Counters {
    /// Incoming interface to onward interface (client to endpoint).
    pub forward: DirCounters,
    /// Onward interface to incoming interface (endpoint to client).
    pub reverse: DirCounters,
    dropped: AtomicU64,
}

impl Counters {
    /// Packets received but not forwarded (too big for the buffer, refused
    /// by the other interface, its queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn drop_one(&self) {
        self.dropped
            .store(self.dropped.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// A bidirectional forwarding between two interfaces of the calling
/// thread's network namespace, run by its own thread. Dropping it stops the
/// thread and waits for it.
#[derive(Debug)]
pub struct Link {
    counters: Arc<Counters>,
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts forwarding between `incoming` and `onward` (interface names)
    /// on a new thread, which inherits the caller's network namespace. The
    /// interfaces need not exist yet: the thread waits for them, and logs a
    /// warning if they are still missing after `appear_timeout` (it keeps
    /// waiting, at a slower pace, until stopped).
    ///
    /// # Errors
    /// `InvalidInput` for a name that is empty, longer than 15 bytes or
    /// contains NUL; an I/O error if the eventfd or the thread cannot be
    /// created.
    pub fn spawn(incoming: &str, onward: &str, appear_timeout: Duration) -> io::Result<Link> {
        let names = [ifname(incoming)?, ifname(onward)?];
        let stop = Arc::new(eventfd()?);
        let counters = Arc::new(Counters::default());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("pt-{onward}"))
                .spawn(move || run(&names, &stop, &counters, appear_timeout))?
        };
        Ok(Link {
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The link's counters, shared with its thread.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Stops the thread and waits for it; the counters are final after this.
    pub fn stop(mut self) -> Arc<Counters> {
        self.halt();
        self.counters.clone()
    }

    fn halt(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let one: u64 = 1;
        // SAFETY: `stop` is an open eventfd owned by `self`; we pass a
        // pointer to 8 readable bytes that live across the call, as eventfd
        // writes require.
        let r = unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&raw const one).cast::<libc::c_void>(),
                size_of::<u64>(),
            )
        };
        if r < 0 {
            tracing::error!(error = %io::Error::last_os_error(), "cannot stop a forwarding thread");
            return;
        }
        if thread.join().is_err() {
            tracing::error!("a forwarding thread panicked");
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Checks that this process may open packet sockets (`CAP_NET_RAW` in its
/// network namespace's owning user namespace).
///
/// # Errors
/// The `socket(2)` error, typically `EPERM`.
pub fn check_packet_sockets() -> io::Result<()> {
    packet_socket().map(drop)
}

fn ifname(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.len() > nsm_proto::mechanisms::kernel::IFNAME_MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{name}` must have 1 to 15 bytes"),
        ));
    }
    CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name `{name}` contains NUL"),
        )
    })
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The ifindex of `name` in the calling thread's namespace.
fn ifindex(name: &CString) -> Option<i32> {
    // SAFETY: `name` is a NUL-terminated string alive across the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    i32::try_from(i).ok().filter(|i| *i > 0)
}

/// Waits up to `timeout` for the stop eventfd; true if stopped.
fn stopped(stop: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, alive across the call.
    let r = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    r > 0
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is open; we pass a pointer to an int and its size, alive
    // across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const v).cast::<libc::c_void>(),
            socklen::<libc::c_int>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("socket structures are small")
}

/// An unbound raw packet socket; protocol 0 so that it receives nothing
/// until bound.
fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eth_p_all() -> u16 {
    u16::try_from(libc::ETH_P_ALL)
        .expect("ETH_P_ALL fits 16 bits")
        .to_be()
}

fn sockaddr(ifindex: i32, protocol_be: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_ll = unsafe { zeroed() };
    a.sll_family = libc::c_ushort::try_from(libc::AF_PACKET).expect("AF_PACKET fits 16 bits");
    a.sll_protocol = protocol_be;
    a.sll_ifindex = ifindex;
    a
}

/// A packet socket bound to `ifindex`, with virtio-net headers, that does
/// not see its interface's outgoing packets.
fn bound_socket(ifindex: i32) -> io::Result<OwnedFd> {
    let fd = packet_socket()?;
    setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    // Before 4.20 this fails; the pkttype check below still applies.
    let _ = setsockopt_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
    if setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF);
    }
    let addr = sockaddr(ifindex, eth_p_all());
    // SAFETY: `fd` is open; `addr` is a valid sockaddr_ll alive across the
    // call, and its exact size is passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            socklen::<libc::sockaddr_ll>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// How [`pump`] ended.
enum Exit {
    Stopped,
    /// An interface disappeared or was replaced: wait and bind again.
    Rebind,
}

/// The link's thread.
fn run(names: &[CString; 2], stop: &OwnedFd, counters: &Counters, appear_timeout: Duration) {
    let show = |i: usize| names[i].to_string_lossy().into_owned();
    let (incoming, onward) = (show(0), show(1));
    let span = tracing::info_span!("link", %incoming, %onward);
    let _enter = span.enter();
    // The one buffer of this link (see the module doc).
    let mut buf = vec![0u8; BUF_LEN];
    loop {
        let since = Instant::now();
        let mut warned = false;
        let idx = loop {
            if let (Some(a), Some(b)) = (ifindex(&names[0]), ifindex(&names[1])) {
                break [a, b];
            }
            if !warned && since.elapsed() >= appear_timeout {
                tracing::warn!(
                    incoming_present = ifindex(&names[0]).is_some(),
                    onward_present = ifindex(&names[1]).is_some(),
                    "interfaces did not appear within {appear_timeout:?}; still waiting"
                );
                warned = true;
            }
            let pace = if warned {
                POLL_SLOW
            } else if since.elapsed() < EAGER {
                POLL_EAGER
            } else {
                POLL_FAST
            };
            if stopped(stop, pace) {
                return;
            }
        };
        let socks = match (bound_socket(idx[0]), bound_socket(idx[1])) {
            (Ok(a), Ok(b)) => [a, b],
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot bind packet sockets; retrying");
                if stopped(stop, POLL_SLOW) {
                    return;
                }
                continue;
            }
        };
        tracing::info!(
            incoming_ifindex = idx[0],
            onward_ifindex = idx[1],
            "forwarding"
        );
        match pump(&socks, idx, names, stop, counters, &mut buf) {
            Exit::Stopped => return,
            Exit::Rebind => tracing::info!("an interface went away; waiting for it again"),
        }
    }
}

/// Forwards until stopped or an interface is replaced.
fn pump(
    socks: &[OwnedFd; 2],
    idx: [i32; 2],
    names: &[CString; 2],
    stop: &OwnedFd,
    counters: &Counters,
    buf: &mut [u8],
) -> Exit {
    let mut fds = [
        libc::pollfd {
            fd: socks[0].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: socks[1].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let dirs = [&counters.forward, &counters.reverse];
    let mut last_drop_log: Option<Instant> = None;
    let mut logged_drops = 0;
    loop {
        // SAFETY: `fds` is an array of 3 valid pollfds alive across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "poll failed");
            return Exit::Rebind;
        }
        if fds[2].revents != 0 {
            return Exit::Stopped;
        }
        for from in 0..2 {
            if fds[from].revents == 0 {
                continue;
            }
            let to = 1 - from;
            let gone = drain(
                socks[from].as_raw_fd(),
                socks[to].as_raw_fd(),
                idx[to],
                dirs[from],
                counters,
                buf,
            );
            if gone && (ifindex(&names[0]) != Some(idx[0]) || ifindex(&names[1]) != Some(idx[1])) {
                return Exit::Rebind;
            }
        }
        let dropped = counters.dropped();
        if dropped != logged_drops && last_drop_log.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(dropped_total = dropped, "packets dropped");
            logged_drops = dropped;
            last_drop_log = Some(Instant::now());
        }
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETDOWN | libc::ENXIO | libc::ENODEV)
    )
}

/// Moves up to [`BATCH`] received packets from socket `rx` to socket `tx`
/// (bound to `tx_ifindex`). Returns whether a socket reported its device
/// down or gone.
fn drain(
    rx: RawFd,
    tx: RawFd,
    tx_ifindex: i32,
    dir: &DirCounters,
    counters: &Counters,
    buf: &mut [u8],
) -> bool {
    for _ in 0..BATCH {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut from_len = socklen::<libc::sockaddr_ll>();
        // SAFETY: `rx` is an open socket; `buf` is writable for `buf.len()`
        // bytes and `from`/`from_len` describe a writable sockaddr_ll, all
        // alive across the call. MSG_TRUNC makes the kernel return the real
        // length but never write past `buf.len()`.
        let n = unsafe {
            libc::recvfrom(
                rx,
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                (&raw mut from).cast::<libc::sockaddr>(),
                &raw mut from_len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return false,
                io::ErrorKind::Interrupted => continue,
                _ if is_gone(&e) => return true,
                // EINVAL: a GSO packet the virtio header cannot describe;
                // the kernel has dropped it.
                _ => {
                    counters.drop_one();
                    continue;
                }
            }
        };
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if n > buf.len() || n < VNET_HDR_LEN {
            counters.drop_one();
            continue;
        }
        // Same protocol as received: for a TUN (no link header) it tells the
        // kernel whether this is IPv4 or IPv6.
        let to = sockaddr(tx_ifindex, from.sll_protocol);
        let mut retried = false;
        loop {
            // SAFETY: `tx` is an open socket; `buf[..n]` is initialised
            // (just received) and `to` is a valid sockaddr_ll, alive across
            // the call.
            let r = unsafe {
                libc::sendto(
                    tx,
                    buf.as_ptr().cast::<libc::c_void>(),
                    n,
                    0,
                    (&raw const to).cast::<libc::sockaddr>(),
                    socklen::<libc::sockaddr_ll>(),
                )
            };
            if r >= 0 {
                dir.add(n - VNET_HDR_LEN);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ENOBUFS) if !retried => {
                    // The send buffer is full: give it a moment, once.
                    retried = true;
                    let mut pfd = libc::pollfd {
                        fd: tx,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, alive across the call.
                    unsafe { libc::poll(&raw mut pfd, 1, 50) };
                }
                _ => {
                    counters.drop_one();
                    if is_gone(&e) {
                        return true;
                    }
                    break;
                }
            }
        }
    }
    false
}
