//! What the built-in stages share: the fields a stage looks at
//! ([`Fields`]), a fixed-capacity flow table ([`FlowTable`]) for connection
//! tracking (stateful `acl`, `nat44`), and a seeded PRNG ([`SplitMix64`])
//! for `fault`.
//!
//! # Flow table
//! Open addressing over a power-of-two array allocated once, when the stage
//! is built. A key lives in one of the `WINDOW` slots after its hash
//! (bounded linear probing); lookups always look at the whole window, so
//! removal is just emptying a slot (no tombstones) and an expired entry is
//! a free slot. Every operation is O(`WINDOW`) = O(1) and never allocates.
//! When all the slots of a key's window hold live entries, the insert fails
//! ([`TableFull`]) and the stage drops the packet with a reason: the table
//! can report "full" before it is 100 % occupied, which is the price of a
//! constant bound on work per packet.
//!
//! The hash is a multiply-fold (foldhash-style) keyed per table with keys
//! drawn from `RandomState` when the stage is built (control thread),
//! because packet senders choose the keys: with a public hash they could
//! fill the windows of someone else's flows. It costs a few nanoseconds
//! where SipHash costs tens.
//!
//! Expiry is idle time measured with the caller's `now`: an entry lives
//! until `expires`, pushed forward on every packet of the flow.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::packet::{IpPacket, IpVersion, read_array};

/// IP protocol numbers the stages understand.
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// The header fields classification and connection tracking look at, read
/// once per packet per stage from offsets `parse_ip` vouched for.
///
/// Addresses are `u128` with IPv4 in the top 32 bits, so one prefix mask
/// formula serves both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fields {
    pub(crate) v6: bool,
    pub(crate) proto: u8,
    pub(crate) src: u128,
    pub(crate) dst: u128,
    /// TCP/UDP ports, when the packet carries the L4 header (not a later
    /// fragment, at least 4 bytes). ACL port rules match only these.
    pub(crate) ports: Option<(u16, u16)>,
    /// Ports for connection tracking: the TCP/UDP ports, or for ICMP echo
    /// `(id, 0)` on a request and `(0, id)` on a reply, so that a reply's
    /// tuple is exactly the reverse of its request's. `(0, 0)` otherwise.
    pub(crate) flow_ports: (u16, u16),
    /// The packet is an ICMP/ICMPv6 echo request or reply with its id.
    pub(crate) echo: Option<Echo>,
}

/// ICMP echo facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Echo {
    pub(crate) request: bool,
    pub(crate) id: u16,
}

impl Fields {
    /// Reads the fields of a classified packet. Never panics: short or
    /// odd packets yield `ports: None`.
    #[inline]
    pub(crate) fn of(packet: &IpPacket<'_>) -> Fields {
        let meta = packet.meta();
        let bytes = packet.bytes();
        let (v6, src, dst) = match meta.version {
            IpVersion::V4 => (
                false,
                u128::from(u32::from_be_bytes(read_array::<4>(bytes, 12))) << 96,
                u128::from(u32::from_be_bytes(read_array::<4>(bytes, 16))) << 96,
            ),
            IpVersion::V6 => (
                true,
                u128::from_be_bytes(read_array::<16>(bytes, 8)),
                u128::from_be_bytes(read_array::<16>(bytes, 24)),
            ),
        };
        let l4 = packet.l4();
        let has_l4 = !meta.later_fragment;
        let mut f = Fields {
            v6,
            proto: meta.protocol,
            src,
            dst,
            ports: None,
            flow_ports: (0, 0),
            echo: None,
        };
        match meta.protocol {
            PROTO_TCP | PROTO_UDP if has_l4 && l4.len() >= 4 => {
                let p = (
                    u16::from_be_bytes(read_array::<2>(l4, 0)),
                    u16::from_be_bytes(read_array::<2>(l4, 2)),
                );
                f.ports = Some(p);
                f.flow_ports = p;
            }
            PROTO_ICMP | PROTO_ICMPV6 if has_l4 && l4.len() >= 8 => {
                let (req, rep) = if v6 { (128, 129) } else { (8, 0) };
                let ty = l4.first().copied().unwrap_or(255);
                let id = u16::from_be_bytes(read_array::<2>(l4, 4));
                let family_ok = (meta.protocol == PROTO_ICMPV6) == v6;
                if family_ok && (ty == req || ty == rep) {
                    f.echo = Some(Echo {
                        request: ty == req,
                        id,
                    });
                    f.flow_ports = if ty == req { (id, 0) } else { (0, id) };
                }
            }
            _ => {}
        }
        f
    }

    /// The fields of `packet` from `cache`, read into it first if empty:
    /// how a chain reads them once for all its stages.
    #[inline]
    pub(crate) fn cached<'c>(cache: &'c mut Option<Fields>, packet: &IpPacket<'_>) -> &'c Fields {
        cache.get_or_insert_with(|| Fields::of(packet))
    }
}

/// A flow's 5-tuple (plus family) as a hashable key. Stages decide what the
/// fields mean (ordered by direction, or canonical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlowKey {
    pub(crate) v6: bool,
    pub(crate) proto: u8,
    pub(crate) a: u128,
    pub(crate) b: u128,
    pub(crate) pa: u16,
    pub(crate) pb: u16,
}

impl Hash for FlowKey {
    /// Five words: the addresses, then family, protocol and ports packed.
    #[inline]
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u128(self.a);
        h.write_u128(self.b);
        h.write_u64(
            u64::from(self.v6) << 40
                | u64::from(self.proto) << 32
                | u64::from(self.pa) << 16
                | u64::from(self.pb),
        );
    }
}

impl FlowKey {
    /// The packet's tuple, as it travels.
    #[inline]
    pub(crate) fn of(f: &Fields) -> FlowKey {
        FlowKey {
            v6: f.v6,
            proto: f.proto,
            a: f.src,
            b: f.dst,
            pa: f.flow_ports.0,
            pb: f.flow_ports.1,
        }
    }

    /// The same flow seen from the other end.
    #[inline]
    pub(crate) fn reversed(self) -> FlowKey {
        FlowKey {
            a: self.b,
            b: self.a,
            pa: self.pb,
            pb: self.pa,
            ..self
        }
    }

    /// One key for both directions, and whether the packet's own tuple was
    /// swapped to get it.
    #[inline]
    pub(crate) fn canonical(self) -> (FlowKey, bool) {
        if (self.a, self.pa) <= (self.b, self.pb) {
            (self, false)
        } else {
            (self.reversed(), true)
        }
    }
}

/// Multiplies and folds the 128-bit product: the mixing step of
/// foldhash/wyhash.
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    // Truncation intended: the low and the high half, xored.
    #[allow(clippy::cast_possible_truncation)]
    let (lo, hi) = (r as u64, (r >> 64) as u64);
    lo ^ hi
}

/// A keyed multiply-fold hash: much cheaper than SipHash for a 40-byte
/// key, and keyed per table (random keys drawn at build) so that senders
/// cannot aim their flows at one window without knowing the keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FoldState {
    k0: u64,
    k1: u64,
}

impl FoldState {
    pub(crate) fn random() -> Self {
        let rs = RandomState::new();
        FoldState {
            k0: rs.hash_one(0x6e73_6d5f_6b30_u64),
            // Odd, so the multiplier never zeroes the state.
            k1: rs.hash_one(0x6e73_6d5f_6b31_u64) | 1,
        }
    }
}

impl BuildHasher for FoldState {
    type Hasher = FoldHasher;
    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            acc: self.k0,
            k: self.k1,
        }
    }
}

/// The hasher of [`FoldState`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct FoldHasher {
    acc: u64,
    k: u64,
}

impl Hasher for FoldHasher {
    #[inline]
    fn finish(&self) -> u64 {
        fold_mul(self.acc ^ 0x2d35_8dcc_aa6c_78a5, self.k)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            if let Some(d) = b.get_mut(..c.len()) {
                d.copy_from_slice(c);
            }
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.acc = fold_mul(self.acc ^ i, self.k);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        let b = i.to_le_bytes();
        self.write_u64(u64::from_le_bytes(read_array::<8>(&b, 0)));
        self.write_u64(u64::from_le_bytes(read_array::<8>(&b, 8)));
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// Slots looked at per key: the bound on work per operation.
const WINDOW: usize = 8;

/// Largest table a spec may ask for (2^22 slots; about 300 MiB for the
/// biggest entries). Bigger is a spec error, not an allocation failure.
pub(crate) const MAX_CAPACITY: usize = 1 << 22;

#[derive(Clone, Copy, Debug)]
struct Slot<K, V> {
    key: K,
    value: V,
    expires: Instant,
}

/// No free slot in the key's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableFull;

/// Fixed-capacity flow table; see the module doc.
#[derive(Debug)]
pub(crate) struct FlowTable<K, V> {
    slots: Box<[Option<Slot<K, V>>]>,
    mask: usize,
    window: usize,
    hasher: FoldState,
}

impl<K: Copy + Eq + Hash, V: Copy> FlowTable<K, V> {
    /// Allocates room for `capacity` flows (rounded up to a power of two,
    /// clamped to 1..=[`MAX_CAPACITY`]). The only allocation the table does.
    pub(crate) fn new(capacity: usize) -> Self {
        let n = capacity.clamp(1, MAX_CAPACITY).next_power_of_two();
        FlowTable {
            slots: vec![None; n].into_boxed_slice(),
            mask: n - 1,
            window: WINDOW.min(n),
            hasher: FoldState::random(),
        }
    }

    #[inline]
    fn start(&self, key: &K) -> usize {
        let h = self.hasher.hash_one(key);
        // The mask fits in usize, so the masked hash does too.
        usize::try_from(h & self.mask as u64).unwrap_or(0)
    }

    /// Index of the live entry for `key`.
    #[inline]
    fn find(&self, key: &K, now: Instant) -> Option<usize> {
        let start = self.start(key);
        (0..self.window).map(|i| (start + i) & self.mask).find(
            |&i| matches!(self.slots.get(i), Some(Some(s)) if s.key == *key && s.expires > now),
        )
    }

    /// The live value for `key`, with its expiry pushed to `now + ttl`.
    #[inline]
    pub(crate) fn touch(&mut self, key: &K, now: Instant, ttl: Duration) -> Option<V> {
        let i = self.find(key, now)?;
        match self.slots.get_mut(i) {
            Some(Some(s)) => {
                s.expires = now + ttl;
                Some(s.value)
            }
            _ => None,
        }
    }

    /// True if `key` has a live entry (does not refresh it).
    #[inline]
    pub(crate) fn contains(&self, key: &K, now: Instant) -> bool {
        self.find(key, now).is_some()
    }

    /// Inserts or replaces `key`, live until `now + ttl`.
    #[inline]
    pub(crate) fn insert(
        &mut self,
        key: K,
        value: V,
        now: Instant,
        ttl: Duration,
    ) -> Result<(), TableFull> {
        let start = self.start(&key);
        let mut free = None;
        for i in (0..self.window).map(|i| (start + i) & self.mask) {
            match self.slots.get(i) {
                Some(Some(s)) if s.key == key => {
                    free = Some(i);
                    break;
                }
                Some(Some(s)) if s.expires > now => {}
                Some(_) if free.is_none() => free = Some(i),
                _ => {}
            }
        }
        let slot = free.and_then(|i| self.slots.get_mut(i)).ok_or(TableFull)?;
        *slot = Some(Slot {
            key,
            value,
            expires: now + ttl,
        });
        Ok(())
    }

    /// Forgets `key`.
    #[inline]
    pub(crate) fn remove(&mut self, key: &K) {
        let start = self.start(key);
        for i in (0..self.window).map(|i| (start + i) & self.mask) {
            if let Some(slot) = self.slots.get_mut(i)
                && matches!(slot, Some(s) if s.key == *key)
            {
                *slot = None;
            }
        }
    }

    /// Live entries (O(capacity); tests only).
    #[cfg(test)]
    pub(crate) fn live(&self, now: Instant) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Some(s) if s.expires > now))
            .count()
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, seedable, statistically
/// fine for sampling drop decisions; not for anything secret.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u16) -> FlowKey {
        FlowKey {
            v6: false,
            proto: 6,
            a: 1,
            b: 2,
            pa: n,
            pb: 80,
        }
    }

    #[test]
    fn insert_touch_expire_remove() {
        let mut t: FlowTable<FlowKey, u32> = FlowTable::new(16);
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        t.insert(key(1), 7, now, ttl).expect("room");
        assert_eq!(t.touch(&key(1), now, ttl), Some(7));
        assert_eq!(t.touch(&key(2), now, ttl), None);
        // Touch pushes expiry forward.
        let later = now + Duration::from_secs(9);
        assert_eq!(t.touch(&key(1), later, ttl), Some(7));
        assert!(t.contains(&key(1), now + Duration::from_secs(18)));
        assert!(!t.contains(&key(1), now + Duration::from_secs(19)));
        t.remove(&key(1));
        assert!(!t.contains(&key(1), later));
    }

    #[test]
    fn full_window_is_reported_and_expired_slots_are_reused() {
        let mut t: FlowTable<FlowKey, u32> = FlowTable::new(4);
        let now = Instant::now();
        let ttl = Duration::from_secs(1);
        for n in 0..4 {
            t.insert(key(n), u32::from(n), now, ttl).expect("room");
        }
        assert_eq!(t.insert(key(9), 9, now, ttl), Err(TableFull));
        // Replacing an existing key is always possible.
        assert_eq!(t.insert(key(2), 22, now, ttl), Ok(()));
        assert_eq!(t.live(now), 4);
        let later = now + ttl;
        assert_eq!(t.insert(key(9), 9, later, ttl), Ok(()));
        assert_eq!(t.live(later), 1);
    }

    #[test]
    fn canonical_key_is_direction_free() {
        let k = key(1000);
        assert_eq!(k.canonical().0, k.reversed().canonical().0);
        assert_ne!(k.canonical().1, k.reversed().canonical().1);
    }
}
