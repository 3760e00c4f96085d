//! One ethdev port with one RX and one TX queue, its mbuf pool, and the
//! batches frames travel in.

use std::ffi::CString;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::eal::{Eal, port_name};
use crate::error::{Error, port_error, rte_errno, strerror};
use crate::sys;

/// Frames per `rte_eth_rx_burst`/`rte_eth_tx_burst` call: DPDK's customary
/// burst, enough to amortise the call and small enough to stay in L1.
pub const BURST: usize = BURST_U16 as usize;
const BURST_U16: u16 = 32;

/// Headroom DPDK leaves in front of the data of a fresh mbuf
/// (`RTE_PKTMBUF_HEADROOM`): room to prepend headers without copying.
pub const MBUF_HEADROOM: u16 = {
    assert!(sys::RTE_PKTMBUF_HEADROOM <= 1024);
    #[allow(clippy::cast_possible_truncation, reason = "checked just above")]
    let h = sys::RTE_PKTMBUF_HEADROOM as u16;
    h
};

/// A length inside an mbuf as DPDK's `uint16_t`. Lengths here are bounded
/// by an mbuf's data room (a `u16`); an impossible larger one saturates,
/// which DPDK then refuses (append/prepend return NULL).
pub(crate) fn mbuf_len(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// A count of mbufs (at most a few bursts) as DPDK's `unsigned int`.
pub(crate) fn mbuf_count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Settings of [`Port::open`].
///
/// Pool sizing: the pool must cover every mbuf that can be outstanding at
/// once: the RX ring (`rx_descriptors`, the driver keeps one posted per
/// descriptor), the TX ring (`tx_descriptors`, freed only after
/// transmission), the per-lcore caches (`mbuf_cache` each, up to 1.5x) and
/// what the application holds ([`RxBatch`]/[`TxBatch`] capacity, plus for
/// [`UdpUnderlay`](crate::UdpUnderlay) its spare stash and the frames
/// queued while a neighbour is being resolved). The defaults need about
/// 1024 + 1024 + 384 + ~400, so 8191 leaves plenty; 8191 mbufs of 2176-byte
/// data room take about 19 MB of EAL memory (`-m`). A pool that runs dry
/// shows as `rx_nombuf` in [`PortStats`] and as
/// [`TxDrop::NoMbuf`](crate::TxDrop::NoMbuf).
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// RX ring size (adjusted to the driver's limits).
    pub rx_descriptors: u16,
    /// TX ring size (adjusted to the driver's limits).
    pub tx_descriptors: u16,
    /// Mbufs in the pool; `2^n - 1` is the most memory-efficient for the
    /// ring-based pool.
    pub mbufs: u32,
    /// Per-lcore mbuf cache (at most 512; 0 disables it).
    pub mbuf_cache: u32,
    /// Bytes of buffer per mbuf, headroom included. The default
    /// (`RTE_MBUF_DEFAULT_BUF_SIZE`, 2176) holds a 1518-byte frame after the
    /// 128-byte headroom.
    pub mbuf_data_room: u16,
    /// MTU to set before starting (`rte_eth_dev_set_mtu`); `None` keeps the
    /// driver's (1500 for `net_af_packet` unless the interface says more).
    pub mtu: Option<u16>,
    /// Receive frames for any destination MAC.
    pub promiscuous: bool,
    /// Receive all multicast frames (IPv6 neighbour discovery needs the
    /// solicited-node group; few drivers filter it precisely).
    pub all_multicast: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            rx_descriptors: 1024,
            tx_descriptors: 1024,
            mbufs: 8191,
            mbuf_cache: 256,
            mbuf_data_room: 2048 + MBUF_HEADROOM,
            mtu: None,
            promiscuous: false,
            all_multicast: true,
        }
    }
}

/// Statistics kept by the driver (`rte_eth_stats_get`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received.
    pub ipackets: u64,
    /// Frames sent.
    pub opackets: u64,
    /// Bytes received.
    pub ibytes: u64,
    /// Bytes sent.
    pub obytes: u64,
    /// Frames the hardware (or the kernel ring) dropped because the RX
    /// queue was full: the application did not poll fast enough.
    pub imissed: u64,
    /// Erroneous frames received.
    pub ierrors: u64,
    /// Failed transmissions.
    pub oerrors: u64,
    /// Receive failures for lack of an mbuf: the pool is too small.
    pub rx_nombuf: u64,
}

/// An mbuf pool (`rte_pktmbuf_pool_create`), freed when the last holder
/// goes: the port, and every batch that holds mbufs from it.
pub(crate) struct Pool {
    ptr: NonNull<sys::rte_mempool>,
    name: String,
    data_room: u16,
    // Keeps the EAL (and its memory) alive while the pool is.
    _eal: Eal,
}

// SAFETY: the pool is created with the default ring ops ("ring_mp_mc"),
// safe for concurrent get/put from any thread; the pointer itself is only
// freed in Drop, when no other holder exists.
unsafe impl Send for Pool {}
// SAFETY: as above; shared access only allocates/frees mbufs, which the
// mp/mc ring makes thread-safe.
unsafe impl Sync for Pool {}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("data_room", &self.data_room)
            .finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the last Arc is gone: the port using it has been closed
        // (its rings released their mbufs) and no batch holds mbufs from it.
        unsafe { sys::rte_mempool_free(self.ptr.as_ptr()) }
    }
}

impl Pool {
    fn create(eal: &Eal, port: u16, config: &PortConfig, socket: i32) -> Result<Arc<Pool>, Error> {
        // Pool names are process-global and limited to 25 bytes.
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!("nsm{port}_{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let cname = CString::new(name.as_str()).expect("generated name has no NUL");
        // SAFETY: cname is a valid C string; the sizes are checked by DPDK,
        // which returns NULL and sets rte_errno when they are not usable.
        let ptr = unsafe {
            sys::rte_pktmbuf_pool_create(
                cname.as_ptr(),
                config.mbufs,
                config.mbuf_cache,
                0,
                config.mbuf_data_room,
                socket,
            )
        };
        match NonNull::new(ptr) {
            Some(ptr) => Ok(Arc::new(Pool {
                ptr,
                name,
                data_room: config.mbuf_data_room,
                _eal: eal.clone(),
            })),
            None => {
                let errno = rte_errno();
                Err(Error::Mempool {
                    name,
                    mbufs: config.mbufs,
                    data_room: config.mbuf_data_room,
                    socket,
                    errno,
                    reason: strerror(errno),
                })
            }
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.ptr.as_ptr()
    }

    /// Mbufs currently free in the pool (cache contents not included).
    pub(crate) fn available(&self) -> u32 {
        // SAFETY: reads the pool's counters; the pool is alive (self).
        unsafe { sys::rte_mempool_avail_count(self.ptr.as_ptr()) }
    }
}

/// A started ethdev port with queue 0 for RX and queue 0 for TX.
///
/// Dropping it stops and closes the port (`rte_eth_dev_stop`,
/// `rte_eth_dev_close`): a closed vdev is gone for the rest of the process.
pub struct Port {
    id: u16,
    name: String,
    mac: [u8; 6],
    mtu: u16,
    pool: Arc<Pool>,
}

impl fmt::Debug for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Port")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("mac", &format_mac(&self.mac))
            .field("mtu", &self.mtu)
            .field("pool", &self.pool)
            .finish()
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the port was started by Port::open and is owned by self;
        // after close, the driver has released the mbufs in its rings, so the
        // pool (dropped after this body) may go.
        unsafe {
            sys::rte_eth_dev_stop(self.id);
            sys::rte_eth_dev_close(self.id);
        }
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn format_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

impl Port {
    /// Configures port `id` with one RX and one TX queue backed by a new
    /// mbuf pool, and starts it.
    pub fn open(eal: &Eal, id: u16, config: &PortConfig) -> Result<Port, Error> {
        // SAFETY: only reads the port table.
        if unsafe { sys::rte_eth_dev_is_valid_port(id) } == 0 {
            return Err(Error::PortNotFound {
                name: format!("#{id}"),
                available: eal
                    .ports()
                    .into_iter()
                    .map(|(_, n)| n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let name = port_name(id).unwrap_or_default();
        if config.mbuf_data_room <= MBUF_HEADROOM + 64 {
            return Err(Error::Config(format!(
                "mbuf_data_room {} leaves no room for a frame after the {MBUF_HEADROOM}-byte headroom",
                config.mbuf_data_room
            )));
        }
        if let Some(mtu) = config.mtu {
            // The port has no scattered RX configured: a whole frame
            // (Ethernet header, one VLAN tag, FCS) must fit one mbuf.
            let frame = u32::from(mtu) + 14 + 4 + 4;
            if frame > u32::from(config.mbuf_data_room - MBUF_HEADROOM) {
                return Err(Error::Config(format!(
                    "MTU {mtu} needs {frame}-byte frames but mbufs hold {} after the headroom",
                    config.mbuf_data_room - MBUF_HEADROOM
                )));
            }
        }

        // SAFETY: only reads the port's data; id is valid.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let pool = Pool::create(eal, id, config, socket)?;

        if let Err(e) = configure_and_start(id, config, &pool, socket) {
            // SAFETY: the port is ours and not running; closing releases
            // its queues (and the mbufs they hold) before the pool goes.
            unsafe {
                sys::rte_eth_dev_stop(id);
                sys::rte_eth_dev_close(id);
            }
            return Err(e);
        }
        // From here on, Drop stops and closes the port on any error.
        let mut port = Port {
            id,
            name,
            mac: [0; 6],
            mtu: 0,
            pool,
        };
        port.set_promiscuous(config.promiscuous)?;
        if config.all_multicast {
            // SAFETY: the port is started.
            let ret = unsafe { sys::rte_eth_allmulticast_enable(id) };
            // Drivers that cannot filter multicast answer -ENOTSUP: they
            // deliver every frame anyway.
            if ret != 0 && ret != -libc::ENOTSUP {
                return Err(port_error(id, "rte_eth_allmulticast_enable", ret));
            }
        }
        let mut addr = sys::rte_ether_addr::default();
        // SAFETY: valid out-pointer.
        let ret = unsafe { sys::rte_eth_macaddr_get(id, &raw mut addr) };
        if ret != 0 {
            return Err(port_error(id, "rte_eth_macaddr_get", ret));
        }
        port.mac = addr.addr_bytes;
        let mut mtu = 0u16;
        // SAFETY: valid out-pointer.
        let ret = unsafe { sys::rte_eth_dev_get_mtu(id, &raw mut mtu) };
        if ret != 0 {
            return Err(port_error(id, "rte_eth_dev_get_mtu", ret));
        }
        port.mtu = mtu;
        Ok(port)
    }

    /// The port id.
    #[must_use]
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The ethdev name (`net_af_packet0`, ...).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The port's MAC address.
    #[must_use]
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The port's MTU (IP packet size, Ethernet header excluded).
    #[must_use]
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Largest frame (Ethernet header included) an mbuf of this port's pool
    /// can hold after the headroom.
    #[must_use]
    pub fn max_frame_len(&self) -> u16 {
        self.pool.data_room - MBUF_HEADROOM
    }

    /// Mbufs currently free in the pool (per-lcore caches not counted).
    #[must_use]
    pub fn pool_available(&self) -> u32 {
        self.pool.available()
    }

    /// Turns promiscuous mode on or off.
    pub fn set_promiscuous(&mut self, on: bool) -> Result<(), Error> {
        // SAFETY: the port is started.
        let ret = unsafe {
            if on {
                sys::rte_eth_promiscuous_enable(self.id)
            } else {
                sys::rte_eth_promiscuous_disable(self.id)
            }
        };
        // Some vdevs cannot switch (ENOTSUP): they stay as they are, which
        // is harmless because UdpUnderlay filters on the MAC itself.
        if ret != 0 && ret != -libc::ENOTSUP {
            return Err(port_error(
                self.id,
                "rte_eth_promiscuous_enable/disable",
                ret,
            ));
        }
        Ok(())
    }

    /// Whether promiscuous mode is on.
    #[must_use]
    pub fn promiscuous(&self) -> bool {
        // SAFETY: reads the port's data.
        unsafe { sys::rte_eth_promiscuous_get(self.id) == 1 }
    }

    /// Whether the link is up (`rte_eth_link_get_nowait`).
    #[must_use]
    pub fn link_up(&self) -> bool {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: valid out-pointer.
        let ret = unsafe { sys::rte_eth_link_get_nowait(self.id, &raw mut link) };
        ret == 0 && link.link_status() != 0
    }

    /// The driver's counters.
    pub fn stats(&self) -> Result<PortStats, Error> {
        let mut s = sys::rte_eth_stats::default();
        // SAFETY: valid out-pointer.
        let ret = unsafe { sys::rte_eth_stats_get(self.id, &raw mut s) };
        if ret != 0 {
            return Err(port_error(self.id, "rte_eth_stats_get", ret));
        }
        Ok(PortStats {
            ipackets: s.ipackets,
            opackets: s.opackets,
            ibytes: s.ibytes,
            obytes: s.obytes,
            imissed: s.imissed,
            ierrors: s.ierrors,
            oerrors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }

    /// Receives up to [`BURST`] frames into `bufs`, releasing the frames it
    /// held before. Returns how many arrived.
    pub fn rx_burst(&mut self, bufs: &mut RxBatch) -> usize {
        bufs.clear();
        if !bufs
            .pool
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &self.pool))
        {
            // Once per batch and port: the batch keeps the pool of the mbufs
            // it holds alive.
            bufs.pool = Some(Arc::clone(&self.pool));
        }
        // SAFETY: bufs.mbufs has room for BURST pointers; queue 0 is set up
        // and only used through &mut self.
        let n = unsafe { sys::nsm_eth_rx_burst(self.id, 0, bufs.mbufs.as_mut_ptr(), BURST_U16) };
        bufs.len = usize::from(n).min(BURST);
        bufs.len
    }

    /// Sends the frames of `bufs` (in order) and removes the ones the driver
    /// took; frames it did not take (TX ring full) stay at the front of the
    /// batch to retry or [`TxBatch::clear`]. Returns how many were sent.
    ///
    /// A batch staged by another port is not sent (returns 0): its mbufs
    /// belong to the other port's pool, which this port cannot keep alive.
    pub fn tx_burst(&mut self, bufs: &mut TxBatch) -> usize {
        if bufs.len == 0 || !Arc::ptr_eq(&bufs.pool, &self.pool) {
            return 0;
        }
        let sent = self.tx_raw(&mut bufs.mbufs[..bufs.len]);
        bufs.mbufs.copy_within(sent..bufs.len, 0);
        bufs.len -= sent;
        sent
    }

    /// `rte_eth_tx_burst` over `mbufs`, which must come from this port's
    /// pool. The driver owns the first `n` afterwards (returned).
    pub(crate) fn tx_raw(&mut self, mbufs: &mut [*mut sys::rte_mbuf]) -> usize {
        let n = u16::try_from(mbufs.len()).unwrap_or(u16::MAX);
        // SAFETY: the first n pointers are valid mbufs from this port's pool
        // (callers' contract); queue 0 is set up and used through &mut self.
        usize::from(unsafe { sys::nsm_eth_tx_burst(self.id, 0, mbufs.as_mut_ptr(), n) })
    }

    /// A batch bound to this port's pool, for [`Port::stage`] and
    /// [`Port::tx_burst`].
    #[must_use]
    pub fn tx_batch(&self) -> TxBatch {
        TxBatch {
            mbufs: [ptr::null_mut(); BURST],
            len: 0,
            pool: Arc::clone(&self.pool),
        }
    }

    /// Appends a `len`-byte frame to `batch` and returns it to be filled
    /// (its content is whatever the mbuf held before).
    pub fn stage<'b>(&self, batch: &'b mut TxBatch, len: u16) -> Result<&'b mut [u8], StageError> {
        if !Arc::ptr_eq(&batch.pool, &self.pool) {
            return Err(StageError::OtherPort);
        }
        if batch.len >= BURST {
            return Err(StageError::BatchFull);
        }
        if len > self.max_frame_len() {
            return Err(StageError::TooLong);
        }
        let m = self.pool.alloc().ok_or(StageError::NoMbuf)?;
        // SAFETY: m is a fresh mbuf from this pool with data_room - headroom
        // bytes of tailroom, at least len (checked above).
        let data = unsafe { sys::nsm_pktmbuf_append(m.as_ptr(), len) };
        if data.is_null() {
            // SAFETY: m is ours and not stored anywhere.
            unsafe { sys::nsm_pktmbuf_free(m.as_ptr()) };
            return Err(StageError::TooLong);
        }
        batch.mbufs[batch.len] = m.as_ptr();
        batch.len += 1;
        // SAFETY: append returned len writable bytes inside the mbuf, which
        // the batch owns until sent or cleared; the borrow of batch keeps
        // the slice from outliving it.
        Ok(unsafe { std::slice::from_raw_parts_mut(data.cast::<u8>(), usize::from(len)) })
    }

    /// The pool, for the UDP layer's own mbuf management.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

/// `rte_eth_dev_configure` with one queue each way, the queues, the MTU,
/// `rte_eth_dev_start`. On error the caller closes the port.
fn configure_and_start(
    id: u16,
    config: &PortConfig,
    pool: &Pool,
    socket: i32,
) -> Result<(), Error> {
    let mut info = sys::rte_eth_dev_info::default();
    // SAFETY: info is a valid out-pointer of the right type.
    let ret = unsafe { sys::rte_eth_dev_info_get(id, &raw mut info) };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_dev_info_get", ret));
    }
    let room = u32::from(pool.data_room - MBUF_HEADROOM);
    if room < info.min_rx_bufsize {
        return Err(Error::Config(format!(
            "the driver needs receive buffers of {} bytes, mbufs hold {room} after the headroom",
            info.min_rx_bufsize
        )));
    }
    if let Some(mtu) = config.mtu
        && (mtu < info.min_mtu || mtu > info.max_mtu)
    {
        return Err(Error::Config(format!(
            "MTU {mtu} is outside the driver's {}..={}",
            info.min_mtu, info.max_mtu
        )));
    }

    // All-zero: no RSS, no offloads, default link speed. Checksums are
    // computed in software because af_packet/tap offer no offloads and
    // the cost is small next to WireGuard's crypto.
    let conf = sys::rte_eth_conf::default();
    // SAFETY: conf is a valid rte_eth_conf; one queue each way.
    let ret = unsafe { sys::rte_eth_dev_configure(id, 1, 1, &raw const conf) };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_dev_configure", ret));
    }
    let mut nb_rxd = config.rx_descriptors;
    let mut nb_txd = config.tx_descriptors;
    // SAFETY: valid out-pointers; the port is configured.
    let ret =
        unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(id, &raw mut nb_rxd, &raw mut nb_txd) };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_dev_adjust_nb_rx_tx_desc", ret));
    }
    // rte_eth_dev_socket_id returns -1 (SOCKET_ID_ANY) when unknown, which
    // the queue setup accepts as "any"; its parameter is unsigned.
    let queue_socket = socket.cast_unsigned();
    // SAFETY: the port is configured with one RX queue; a NULL rxconf
    // selects the driver defaults; the pool outlives the port (the port
    // holds an Arc and closes itself before dropping it).
    let ret = unsafe {
        sys::rte_eth_rx_queue_setup(id, 0, nb_rxd, queue_socket, ptr::null(), pool.as_ptr())
    };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_rx_queue_setup", ret));
    }
    // SAFETY: one TX queue configured; NULL txconf selects the defaults.
    let ret = unsafe { sys::rte_eth_tx_queue_setup(id, 0, nb_txd, queue_socket, ptr::null()) };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_tx_queue_setup", ret));
    }
    if let Some(mtu) = config.mtu {
        // SAFETY: the port is configured and stopped.
        let ret = unsafe { sys::rte_eth_dev_set_mtu(id, mtu) };
        if ret != 0 {
            return Err(port_error(id, "rte_eth_dev_set_mtu", ret));
        }
    }
    // SAFETY: the port is configured with its queues set up.
    let ret = unsafe { sys::rte_eth_dev_start(id) };
    if ret != 0 {
        return Err(port_error(id, "rte_eth_dev_start", ret));
    }
    Ok(())
}

impl Pool {
    /// One fresh mbuf (data offset at the headroom, length 0).
    pub(crate) fn alloc(&self) -> Option<NonNull<sys::rte_mbuf>> {
        // SAFETY: the pool is alive (self).
        NonNull::new(unsafe { sys::nsm_pktmbuf_alloc(self.as_ptr()) })
    }
}

/// Why [`Port::stage`] could not add a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    /// The batch already holds [`BURST`] frames: send it first.
    #[error("the TX batch is full")]
    BatchFull,
    /// The pool has no free mbuf.
    #[error("the mbuf pool is empty")]
    NoMbuf,
    /// The frame does not fit an mbuf.
    #[error("the frame is longer than an mbuf holds")]
    TooLong,
    /// The batch was made by another port.
    #[error("the TX batch belongs to another port")]
    OtherPort,
}

/// Frames received by [`Port::rx_burst`]; they stay valid until the next
/// burst into this batch, [`RxBatch::clear`], or drop.
pub struct RxBatch {
    mbufs: [*mut sys::rte_mbuf; BURST],
    len: usize,
    pool: Option<Arc<Pool>>,
}

// SAFETY: the batch exclusively owns the mbufs it points to, and their pool
// is kept alive by the Arc; mbufs may be freed from any thread.
unsafe impl Send for RxBatch {}

impl fmt::Debug for RxBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxBatch")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Default for RxBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// One received frame.
#[derive(Debug, Clone, Copy)]
pub struct RxFrame<'a> {
    /// The bytes of the first segment: the whole frame when `segments` is 1.
    pub data: &'a [u8],
    /// Length of the whole frame over all segments.
    pub pkt_len: u32,
    /// Number of segments (more than one only with scattered RX, which
    /// [`Port::open`] does not enable, or oversized frames on some drivers).
    pub segments: u16,
    /// The driver took a VLAN tag off the frame (`net_af_packet` does when
    /// the kernel accelerated it): `data` no longer shows it.
    pub vlan_stripped: bool,
}

impl RxBatch {
    /// An empty batch.
    #[must_use]
    pub fn new() -> Self {
        RxBatch {
            mbufs: [ptr::null_mut(); BURST],
            len: 0,
            pool: None,
        }
    }

    /// Number of frames held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no frame is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frame `i`, if held.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<RxFrame<'_>> {
        let m = *self.mbufs[..self.len].get(i)?;
        Some(mbuf_frame(m))
    }

    /// The frames held, in arrival order.
    pub fn iter(&self) -> impl Iterator<Item = RxFrame<'_>> + '_ {
        self.mbufs[..self.len].iter().map(|&m| mbuf_frame(m))
    }

    /// Returns the held mbufs to their pool.
    pub fn clear(&mut self) {
        if self.len > 0 {
            // SAFETY: the first len pointers are mbufs received into this
            // batch and owned by it; len is at most BURST.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), mbuf_count(self.len)) };
            self.len = 0;
        }
    }
}

impl Drop for RxBatch {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The data of mbuf `m`, borrowed for as long as the holder of `m`.
fn mbuf_frame<'a>(m: *mut sys::rte_mbuf) -> RxFrame<'a> {
    let mut v = sys::nsm_mbuf_view::default();
    // SAFETY: m is a valid mbuf owned by the caller's batch; v is a valid
    // out-pointer.
    unsafe { sys::nsm_pktmbuf_view(m, &raw mut v) };
    let data = if v.data.is_null() {
        &[][..]
    } else {
        // SAFETY: mtod points at data_len initialised bytes of the first
        // segment, which live until the batch releases the mbuf; the batch
        // is borrowed for 'a.
        unsafe { std::slice::from_raw_parts(v.data, usize::from(v.data_len)) }
    };
    RxFrame {
        data,
        pkt_len: v.pkt_len,
        segments: v.nb_segs,
        vlan_stripped: v.vlan_stripped != 0,
    }
}

/// Frames staged with [`Port::stage`] and not yet taken by
/// [`Port::tx_burst`]. Made by [`Port::tx_batch`]; dropping it frees the
/// frames still in it.
pub struct TxBatch {
    mbufs: [*mut sys::rte_mbuf; BURST],
    len: usize,
    pool: Arc<Pool>,
}

// SAFETY: the batch exclusively owns its mbufs; their pool is kept alive by
// the Arc and is thread-safe.
unsafe impl Send for TxBatch {}

impl fmt::Debug for TxBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxBatch")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl TxBatch {
    /// Number of frames waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no frame waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frees the frames still waiting; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.len;
        if n > 0 {
            // SAFETY: the first len pointers are mbufs owned by the batch.
            unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), mbuf_count(n)) };
            self.len = 0;
        }
        n
    }
}

impl Drop for TxBatch {
    fn drop(&mut self) {
        self.clear();
    }
}
