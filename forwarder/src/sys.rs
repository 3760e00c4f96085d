//! The forwarder's only `unsafe` code: the syscalls std and nix do not wrap.
//!
//! - [`open_tun`]: `open("/dev/net/tun")` + the `TUNSETIFF` ioctl, which
//!   creates a TUN or TAP device in the network namespace of the *calling
//!   thread* (the namespace is taken when the file is opened), and
//!   `TUNSETOFFLOAD` for TSO/checksum offloads.
//! - [`RecvBatch`] / [`SendBatch`]: `recvmmsg(2)` / `sendmmsg(2)` over fixed,
//!   reused buffers, so that one syscall moves a whole batch of WireGuard
//!   datagrams and the packet thread never allocates per packet. Receives
//!   read the UDP_GRO segment size from a control message; sends group runs
//!   of equal-sized datagrams to one peer into one message with a
//!   UDP_SEGMENT control message (UDP GSO).
//!
//! Everything else (epoll, eventfd, socket options) goes through nix.
//! Every `unsafe` block says why it is sound; the structs here own the
//! memory the kernel reads and writes, and rebuild the pointers into it on
//! every call, so moving a batch between calls is harmless.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags union
/// member, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates a TUN (`tap == false`, IP packets) or TAP (`tap == true`,
/// Ethernet frames) device named `name` in the calling thread's network
/// namespace with `queues` queues (at least one), and returns one
/// non-blocking, close-on-exec fd per queue.
///
/// The device is not persistent: the kernel deletes it when the last fd
/// to it is closed, which is how a dead forwarder's pod interfaces go away.
/// With several queues (`IFF_MULTI_QUEUE`) the kernel hashes each flow of
/// the pod's to one queue, and keeps a flow on the queue its packets were
/// last written through; closing a queue's fd takes that queue away.
///
/// With `offload`, the device is opened with `IFF_VNET_HDR` and TCP
/// segmentation and checksum offloads are switched on (`TUNSETOFFLOAD`):
/// every read and write then starts with a `virtio_net_hdr` (see
/// `offload`).
pub(crate) fn open_tun(
    name: &str,
    tap: bool,
    offload: bool,
    queues: usize,
) -> io::Result<Vec<OwnedFd>> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(|b| b == 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1-15 bytes without NUL",
        ));
    }
    let kind = if tap { libc::IFF_TAP } else { libc::IFF_TUN };
    // IFF_NO_PI: no 4-byte protocol header in front of each packet.
    let mut flags = kind | libc::IFF_NO_PI;
    if offload {
        flags |= libc::IFF_VNET_HDR;
    }
    if queues > 1 {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    // IFF_TUN_EXCL: the first open fails instead of attaching to an
    // existing device of the same name (another cross-connect's, or a
    // leftover); the other queues attach to the device it made.
    let first = tun_queue(name, flags | libc::IFF_TUN_EXCL)?;
    if offload {
        let features: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
        // long of feature bits); `first` is the TUN fd configured above.
        // The features belong to the device, so every queue has them.
        let rc = unsafe {
            libc::ioctl(
                first.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(features),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut fds = Vec::with_capacity(queues.max(1));
    fds.push(first);
    for _ in 1..queues {
        fds.push(tun_queue(name, flags)?);
    }
    Ok(fds)
}

/// Opens `/dev/net/tun` and binds it to device `name` with `flags`
/// (`TUNSETIFF`: creates the device, or attaches a queue to it).
fn tun_queue(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // ifr_flags is a C short holding a 16-bit mask: IFF_TUN_EXCL is its
    // sign bit, so reinterpret the bits rather than convert the value.
    let bits = u16::try_from(flags).map_err(|_| io::Error::other("flags overflow"))?;
    req.flags = libc::c_short::from_ne_bytes(bits.to_ne_bytes());
    // SAFETY: `fd` is an open /dev/net/tun fd; TUNSETIFF reads (and may
    // write back the name into) a `struct ifreq`, which `IfReqFlags` matches
    // in layout and size (40 bytes); `req` lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads one packet from a non-blocking fd into `buf`. `Ok(None)` when
/// nothing is ready (`EAGAIN`).
pub(crate) fn read_packet(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match nix::unistd::read(fd, buf) {
        Ok(n) => Ok(Some(n)),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sockaddr_from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in, which
            // fits in (and is less aligned than) sockaddr_storage.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `ss`; returns the length the kernel must be told.
fn sockaddr_to_storage(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in fits in sockaddr_storage, whose alignment is
            // at least sockaddr_in's; we write every field we later read.
            let sin =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default();
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            sin.sin_zero = [0; 8];
            socklen::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or_default();
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            socklen::<libc::sockaddr_in6>()
        }
    }
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// The UDP_GRO segment size in a control buffer the kernel filled with
/// `controllen` bytes, if it holds one (it is the only control message we
/// enable, so it is the first).
fn gro_size(ctrl: &[u64; 8], controllen: usize) -> Option<usize> {
    let hdr_len = size_of::<libc::cmsghdr>();
    if controllen < hdr_len + size_of::<libc::c_int>() {
        return None;
    }
    // SAFETY: the buffer is 64 bytes, 8-byte aligned (u64s), and the
    // kernel wrote at least a cmsghdr (checked above); cmsghdr is plain
    // old data, so reading it is sound.
    let hdr = unsafe { std::ptr::read(ctrl.as_ptr().cast::<libc::cmsghdr>()) };
    if hdr.cmsg_level != libc::SOL_UDP || hdr.cmsg_type != UDP_GRO {
        return None;
    }
    // The data follows the header (CMSG_DATA; the header size is already
    // aligned), as a C int.
    let bytes: &[u8] = {
        let words: &[u64] = ctrl;
        // SAFETY: viewing initialised u64s as bytes is always sound; the
        // length is the same memory (8 words of 8 bytes).
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), size_of::<[u64; 8]>()) }
    };
    let raw = bytes.get(hdr_len..hdr_len + 4)?;
    let size = libc::c_int::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    usize::try_from(size).ok()
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    unsafe { zeroed() }
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data (null pointers and zero lengths are
    // valid values); the pointers are filled in before every syscall.
    unsafe { zeroed() }
}

/// `n` datagram buffers of `slot` bytes each, in one allocation made once.
///
/// Consecutive slots start one cache line further into the cache's set
/// space than a whole number of pages would put them (`stride` is `slot`
/// rounded up to 4 KiB, plus 64). With a plain 64 KiB stride every slot
/// starts on the same sets of L1 and L2, and a batch of small datagrams
/// (TCP ACKs, one per slot) evicts itself before it is read.
#[derive(Debug)]
struct Slots {
    buf: Vec<u8>,
    slot: usize,
    stride: usize,
}

impl Slots {
    fn new(n: usize, slot: usize) -> Self {
        let stride = slot.next_multiple_of(4096) + LINE;
        Slots {
            buf: vec![0; n.saturating_sub(1) * stride + slot],
            slot,
            stride,
        }
    }

    fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let at = i * self.stride;
        &mut self.buf[at..at + self.slot]
    }

    fn get(&self, i: usize) -> &[u8] {
        let at = i * self.stride;
        &self.buf[at..at + self.slot]
    }
}

/// A batch of datagrams received with one `recvmmsg(2)`.
pub(crate) struct RecvBatch {
    slots: Slots,
    /// Control buffers, for the UDP_GRO segment size.
    ctrls: Vec<[u64; 8]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Datagrams filled by the last [`RecvBatch::recv`].
    filled: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.hdrs.len())
            .field("slot", &self.slots.slot)
            .field("filled", &self.filled)
            .finish()
    }
}

impl RecvBatch {
    /// Room for `n` datagrams of up to `slot` bytes.
    pub(crate) fn new(n: usize, slot: usize) -> Self {
        RecvBatch {
            slots: Slots::new(n, slot),
            ctrls: vec![[0; 8]; n],
            addrs: vec![zeroed_storage(); n],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n
            ],
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            filled: 0,
        }
    }

    /// Receives as many datagrams as are ready (up to the capacity) without
    /// blocking; returns how many. 0 means none was ready.
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let n = self.hdrs.len();
        for i in 0..n {
            let slot = self.slots.get_mut(i);
            self.iovs[i] = libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot.len(),
            };
        }
        for i in 0..n {
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = socklen::<libc::sockaddr_storage>();
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrls[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = size_of::<[u64; 8]>();
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let vlen = libc::c_uint::try_from(n).unwrap_or(libc::c_uint::MAX);
        // SAFETY: `hdrs` holds `n` initialised mmsghdrs whose name, iov and
        // control pointers point into `addrs`, `iovs`, `ctrls` and `slots`
        // (with their true lengths), all owned by
        // `self`, alive and not otherwise borrowed for the duration of the
        // call; each iov covers exactly one slot. MSG_DONTWAIT keeps the call
        // from blocking; a null timeout is allowed.
        let rc = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            self.filled = 0;
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(e),
            };
        }
        self.filled = usize::try_from(rc).unwrap_or(0);
        Ok(self.filled)
    }

    /// Message `i` of the last batch: its source, its bytes, and the size
    /// of the datagrams in it. With UDP_GRO the kernel may hand several
    /// datagrams from one source as one message: all of `size` bytes but
    /// the last, which may be shorter. `None` for an address family we do
    /// not speak or a truncated message.
    pub(crate) fn message(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        if i >= self.filled {
            return None;
        }
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let len = h.msg_len as usize;
        let src = sockaddr_from_storage(&self.addrs[i])?;
        let slot = self.slots.get(i);
        let data = &slot[..len.min(slot.len())];
        let size = gro_size(&self.ctrls[i], h.msg_hdr.msg_controllen)
            .filter(|s| *s > 0)
            .unwrap_or(data.len().max(1));
        Some((src, data, size))
    }
}

/// Datagrams queued for one `sendmmsg(2)`. Callers write each datagram
/// straight into [`SendBatch::next_slot`] (so encryption lands in the send
/// buffer: no copy), then [`SendBatch::commit`] it with its destination.
///
/// The datagrams are packed: each slot begins at the first cache line after
/// the datagram committed before it, so a batch of MTU-sized datagrams is
/// one dense run of memory (about 92 KiB for 64 of 1452 bytes) that stays
/// in the core's L2 cache from encryption to the kernel's copy. Slots a
/// whole largest-datagram apart (64 KiB) put every datagram on the same few
/// cache sets; the profile of one TCP stream showed that copy in
/// `sendmmsg` costing four times the TUN write's copy of the same bytes.
pub(crate) struct SendBatch {
    /// `capacity` bytes of packed datagrams, then one spare slot that
    /// [`SendBatch::next_slot`] hands out when the batch is full (so a
    /// caller that ignores [`SendBatch::is_full`] overwrites nothing queued).
    buf: Vec<u8>,
    /// Bytes one slot offers: the largest datagram plus headroom.
    slot: usize,
    /// Where packing ends and the spare slot begins.
    capacity: usize,
    /// Where the next slot begins (64-byte aligned in memory).
    cursor: usize,
    /// Where the first slot begins: `buf`'s first 64-byte boundary.
    first: usize,
    /// Start of each queued datagram in `buf`.
    starts: Vec<usize>,
    lens: Vec<usize>,
    dests: Vec<libc::sockaddr_storage>,
    dest_lens: Vec<libc::socklen_t>,
    /// Destinations as values, to find runs for GSO.
    dest_addrs: Vec<SocketAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// Datagrams in each message of the last flush.
    group_len: Vec<usize>,
    cmsgs: Vec<GsoCmsg>,
    queued: usize,
    /// UDP GSO is used until the kernel refuses it once.
    gso: bool,
    /// Largest datagram grouped with GSO: what fits the underlay MTU
    /// unfragmented (the kernel refuses GSO sends that would need IP
    /// fragments).
    gso_max_seg: usize,
}

/// `UDP_SEGMENT` (linux/udp.h): a send's datagram size for UDP GSO.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` (linux/udp.h): deliver coalesced datagrams with their size.
const UDP_GRO: libc::c_int = 104;
/// Most datagrams in one GSO send (the kernel's UDP_MAX_SEGMENTS is 64 on
/// older kernels).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send (an IP packet's limit, with room for
/// headers).
const GSO_MAX_BYTES: usize = 65_000;

/// A control message carrying one `u16` (the UDP GSO segment size), laid
/// out as `CMSG_SPACE(2)` bytes: header, data, padding to alignment.
#[repr(C)]
#[derive(Clone, Copy)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

/// `CMSG_LEN(2)`: the header (already aligned) plus the data.
const GSO_CMSG_LEN: usize = size_of::<libc::cmsghdr>() + size_of::<u16>();
/// `CMSG_SPACE(2)`: the whole, aligned control buffer.
const GSO_CMSG_SPACE: usize = size_of::<GsoCmsg>();

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("datagrams", &self.hdrs.len())
            .field("slot", &self.slot)
            .field("bytes", &self.capacity)
            .field("queued", &self.queued)
            .finish()
    }
}

/// What a flush did.
#[derive(Debug, Default)]
pub(crate) struct Flushed {
    /// Datagrams the kernel took.
    pub(crate) sent: usize,
    /// Datagrams given up on (send error other than a full buffer).
    pub(crate) failed: usize,
    /// The last send error.
    pub(crate) last_error: Option<io::Error>,
}

/// Bytes of packed send buffer per datagram of a batch: an MTU-1500
/// underlay's datagram, rounded up to cache lines, and some to spare. A
/// batch of larger datagrams (jumbo frames) is sent in more `sendmmsg`
/// calls, never truncated.
const SEND_BYTES_PER_DATAGRAM: usize = 2048;
/// Cache line: where each packed datagram begins.
const LINE: usize = 64;

impl SendBatch {
    /// Room for `n` datagrams; any one may take up to `slot` bytes.
    pub(crate) fn new(n: usize, slot: usize) -> Self {
        let n = n.max(1);
        // Room for `n` typical datagrams and the slot of the last one (a
        // slot is as long as the largest datagram), plus the line to align
        // the start on; then the spare slot.
        let capacity = n * SEND_BYTES_PER_DATAGRAM + slot + LINE;
        let buf = vec![0; capacity + slot];
        let first = buf.as_ptr().align_offset(LINE).min(LINE);
        SendBatch {
            buf,
            slot,
            capacity,
            cursor: first,
            first,
            starts: vec![0; n],
            lens: vec![0; n],
            dests: vec![zeroed_storage(); n],
            dest_lens: vec![0; n],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n
            ],
            hdrs: (0..n).map(|_| zeroed_mmsghdr()).collect(),
            dest_addrs: vec![SocketAddr::from(([0, 0, 0, 0], 0)); n],
            group_len: vec![0; n],
            // SAFETY: cmsghdr is plain old data; zero is a valid value.
            cmsgs: vec![unsafe { zeroed::<GsoCmsg>() }; n],
            queued: 0,
            gso: true,
            gso_max_seg: 1472,
        }
    }

    /// Sets the largest datagram grouped with GSO, in bytes.
    pub(crate) fn set_gso_max_segment(&mut self, bytes: usize) {
        self.gso_max_seg = bytes;
    }

    /// Stops grouping datagrams with UDP GSO (e.g. `--no-gso`).
    pub(crate) fn disable_gso(&mut self) {
        self.gso = false;
    }

    /// True when no slot is free: flush before writing more.
    pub(crate) fn is_full(&self) -> bool {
        self.queued == self.hdrs.len() || self.cursor + self.slot > self.capacity
    }

    /// The buffer the next datagram is written into, `slot` bytes long.
    /// Call only when not [`SendBatch::is_full`]; when full it is a spare
    /// buffer whose datagram [`SendBatch::commit`] refuses.
    pub(crate) fn next_slot(&mut self) -> &mut [u8] {
        let at = if self.is_full() {
            self.capacity
        } else {
            self.cursor
        };
        &mut self.buf[at..at + self.slot]
    }

    /// Queues `len` bytes at offset `off` of the next slot for `dest` (the
    /// data plane may write a datagram behind some headroom). Ignored when
    /// the batch is full or the datagram would not fit the slot.
    pub(crate) fn commit(&mut self, off: usize, len: usize, dest: SocketAddr) {
        if self.is_full() || off.checked_add(len).is_none_or(|end| end > self.slot) {
            return;
        }
        let i = self.queued;
        let start = self.cursor + off;
        self.starts[i] = start;
        // Not full, so `cursor + slot <= capacity`: the next slot begins
        // at most a line past this one's end, inside `buf`, and on a line
        // boundary in memory (`first` is one).
        self.cursor = self.first + (start + len - self.first).next_multiple_of(LINE);
        self.lens[i] = len;
        self.dest_lens[i] = sockaddr_to_storage(&dest, &mut self.dests[i]);
        self.dest_addrs[i] = dest;
        self.queued += 1;
    }

    /// Queued datagrams.
    pub(crate) fn len(&self) -> usize {
        self.queued
    }

    /// Sends every queued datagram; the socket is blocking for sends, so a
    /// full socket buffer applies back-pressure instead of losing packets.
    pub(crate) fn flush(&mut self, fd: BorrowedFd<'_>) -> Flushed {
        let mut out = Flushed::default();
        let n = self.queued;
        if n == 0 {
            return out;
        }
        for i in 0..n {
            let (start, len) = (self.starts[i], self.lens[i]);
            // In bounds: `commit` checked that the datagram lies in a slot
            // that lies in `buf`.
            let data = &self.buf[start..start + len];
            self.iovs[i] = libc::iovec {
                iov_base: data.as_ptr().cast_mut().cast(),
                iov_len: len,
            };
        }
        // Group runs of datagrams to the same destination whose sizes are
        // equal (the last may be shorter) into one message with UDP GSO:
        // the kernel then walks its UDP/IP stack once per run instead of
        // once per datagram, and cuts the run into datagrams at the end.
        let mut groups = 0;
        let mut i = 0;
        while i < n {
            let mut cnt = 1;
            let seg = self.lens[i];
            let mut total = seg;
            if self.gso && seg <= self.gso_max_seg {
                while i + cnt < n
                    && cnt < GSO_MAX_SEGMENTS
                    && self.dest_addrs[i + cnt] == self.dest_addrs[i]
                    && self.lens[i + cnt] <= seg
                    && total + self.lens[i + cnt] <= GSO_MAX_BYTES
                {
                    total += self.lens[i + cnt];
                    cnt += 1;
                    if self.lens[i + cnt - 1] < seg {
                        break; // a shorter datagram ends a run
                    }
                }
            }
            self.group_len[groups] = cnt;
            let h = &mut self.hdrs[groups];
            h.msg_hdr.msg_name = (&mut self.dests[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = self.dest_lens[i];
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = cnt;
            if cnt > 1 {
                let c = &mut self.cmsgs[groups];
                c.hdr.cmsg_len = GSO_CMSG_LEN;
                c.hdr.cmsg_level = libc::SOL_UDP;
                c.hdr.cmsg_type = UDP_SEGMENT;
                c.size = u16::try_from(seg).unwrap_or(u16::MAX);
                h.msg_hdr.msg_control = (c as *mut GsoCmsg).cast();
                h.msg_hdr.msg_controllen = GSO_CMSG_SPACE;
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            groups += 1;
            i += cnt;
        }
        let mut start = 0;
        while start < groups {
            let vlen = libc::c_uint::try_from(groups - start).unwrap_or(libc::c_uint::MAX);
            // SAFETY: hdrs[start..groups] are initialised mmsghdrs whose
            // name, iov and control pointers point into `dests`, `iovs`
            // (runs of `msg_iovlen` entries, all within `iovs[..n]`),
            // `cmsgs` and `buf`, all owned by `self`, alive and not moved
            // during the call; the kernel only reads them and writes
            // `msg_len`.
            let rc =
                unsafe { libc::sendmmsg(fd.as_raw_fd(), self.hdrs[start..].as_mut_ptr(), vlen, 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message failed. A GSO run refused with EIO or
                // EINVAL means the path cannot do UDP GSO: stop using it
                // (this run is lost; the peers' TCP resends it).
                if self.group_len[start] > 1
                    && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
                {
                    self.gso = false;
                }
                out.failed += self.group_len[start];
                out.last_error = Some(e);
                start += 1;
                continue;
            }
            let sent = usize::try_from(rc).unwrap_or(0);
            out.sent += self.group_len[start..start + sent.min(groups - start)]
                .iter()
                .sum::<usize>();
            if sent == 0 {
                out.failed += self.group_len[start];
                start += 1;
            }
            start += sent;
        }
        self.queued = 0;
        self.cursor = self.first;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest() -> SocketAddr {
        "198.51.100.9:51820".parse().expect("addr")
    }

    impl SendBatch {
        fn queued(&self, i: usize) -> &[u8] {
            &self.buf[self.starts[i]..self.starts[i] + self.lens[i]]
        }
    }

    /// Writes a datagram of `len` bytes of `fill` at `off` into the next
    /// slot, scribbling over the rest of the slot as the data plane may,
    /// and commits it.
    fn put(b: &mut SendBatch, off: usize, len: usize, fill: u8) {
        let slot = b.next_slot();
        slot.fill(0xee);
        slot[off..off + len].fill(fill);
        b.commit(off, len, dest());
    }

    #[test]
    fn packed_datagrams_survive_later_slots_and_start_on_lines() {
        let mut b = SendBatch::new(64, 66_000);
        let mut i = 0u8;
        while !b.is_full() {
            let slot_at = b.next_slot().as_ptr() as usize;
            assert_eq!(slot_at % LINE, 0, "slot {i} is not line-aligned");
            // Odd sizes and offsets, as headroom and padding make them.
            put(
                &mut b,
                usize::from(i % 3) * 16,
                1300 + usize::from(i) * 3,
                i,
            );
            i += 1;
        }
        assert_eq!(b.len(), 64, "64 MTU-sized datagrams fit one batch");
        // Full: the next slot is the spare one and a commit is refused.
        put(&mut b, 0, 1400, 0xaa);
        assert_eq!(b.len(), 64);
        for j in 0..64u8 {
            let d = b.queued(usize::from(j));
            assert_eq!(d.len(), 1300 + usize::from(j) * 3);
            assert!(d.iter().all(|&x| x == j), "datagram {j} was overwritten");
        }
        // Dense: the whole batch spans about its own bytes, not 64 slots.
        let span = b.starts[63] + b.lens[63] - b.starts[0];
        assert!(span < 64 * 1500, "batch spans {span} bytes");
    }

    #[test]
    fn large_datagrams_fill_the_batch_by_bytes_and_never_overflow() {
        let slot = 66_000;
        let mut b = SendBatch::new(8, slot);
        let mut n = 0;
        while !b.is_full() {
            put(&mut b, 0, 9000, n);
            n += 1;
        }
        // 8 slots of 2 KiB plus one largest: one 9000-byte datagram behind
        // another until less than a whole slot is left.
        assert!((1..8).contains(&n), "{n} jumbo datagrams queued");
        for j in 0..n {
            assert!(b.queued(usize::from(j)).iter().all(|&x| x == j));
        }
        // A datagram that would overrun its slot is refused, not cut.
        let mut b = SendBatch::new(2, 1500);
        b.commit(100, 1401, dest());
        assert_eq!(b.len(), 0);
        b.commit(99, 1401, dest());
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn receive_slots_do_not_overlap_and_skew_across_cache_sets() {
        let mut s = Slots::new(64, 65_535);
        for i in 0..64u8 {
            s.get_mut(usize::from(i)).fill(i);
        }
        let mut sets = std::collections::HashSet::new();
        for i in 0..64 {
            assert!(s.get(i).iter().all(|&x| usize::from(x) == i));
            assert_eq!(s.get(i).len(), 65_535);
            // The L2 set (64 KiB period) of each slot's first line.
            sets.insert((s.get(i).as_ptr() as usize % 65_536) / LINE);
        }
        assert_eq!(sets.len(), 64, "slots share cache sets");
    }
}
