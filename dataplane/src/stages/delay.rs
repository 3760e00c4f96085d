//! A delay line for `fault`'s added delay: a FIFO of preallocated packet
//! slots that the forwarder fills with packets the data plane has already
//! processed and drains when they are due.
//!
//! Why here and not in the stage: the packet's buffer belongs to the
//! caller, and a stage cannot keep it.
//! So `fault` only publishes its delay ([`super::FaultHandle::delay`]); the
//! forwarder, which owns time and I/O, pushes each output of that
//! connection (the `ToPod`/`ToUnderlay` bytes, with where it goes as `T`)
//! into a `DelayLine` instead of writing it, and writes what
//! [`DelayLine::pop_due`] returns once [`DelayLine::next_due`] has passed.
//!
//! The same FIFO holds what a `ratelimit` shaper queued: the forwarder
//! pushes each held output with [`DelayLine::push_at`] and the time the
//! stage gave ([`crate::Verdict::Hold`]).
//!
//! With one constant delay per line, due times are in push order, so a ring
//! is enough: O(1) push and pop, a copy in and a copy out, every slot
//! allocated by [`DelayLine::new`], no I/O, `now` passed in. `push_at` keeps
//! that order by never giving a packet an earlier time than the one before
//! it. A full line, or a packet larger than a slot, is refused
//! ([`DelayError`]): the caller drops and counts it, as a full queue would.

use std::time::{Duration, Instant};

/// Why a packet could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DelayError {
    /// Every slot holds a packet that is not due yet.
    #[error("delay line full")]
    Full,
    /// The packet is larger than a slot.
    #[error("packet larger than a delay slot")]
    TooBig,
}

#[derive(Clone, Copy, Debug)]
struct Meta<T> {
    len: usize,
    due: Instant,
    tag: T,
}

/// A fixed-size FIFO of delayed packets; see the module doc.
#[derive(Debug)]
pub struct DelayLine<T> {
    bufs: Box<[Box<[u8]>]>,
    meta: Box<[Option<Meta<T>>]>,
    slot_size: usize,
    delay: Duration,
    head: usize,
    len: usize,
}

impl<T: Copy> DelayLine<T> {
    /// A line delaying by `delay`, holding up to `slots` (at least 1)
    /// packets of up to `slot_size` bytes, all allocated now.
    pub fn new(delay: Duration, slots: usize, slot_size: usize) -> Self {
        let n = slots.max(1);
        DelayLine {
            bufs: (0..n)
                .map(|_| vec![0u8; slot_size].into_boxed_slice())
                .collect(),
            meta: (0..n).map(|_| None).collect(),
            slot_size,
            delay,
            head: 0,
            len: 0,
        }
    }

    /// The configured delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The largest packet a slot holds, in bytes.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a copy of `packet`, due at `now + delay`, with the caller's
    /// `tag` (where it goes).
    pub fn push(&mut self, now: Instant, packet: &[u8], tag: T) -> Result<(), DelayError> {
        self.push_at(now + self.delay, packet, tag)
    }

    /// Queues a copy of `packet` due at `due` (not `now + delay`: the
    /// caller computed the time, e.g. a shaper's departure time), or at the
    /// due time of the packet queued before it if that is later, so the
    /// line stays in order.
    pub fn push_at(&mut self, due: Instant, packet: &[u8], tag: T) -> Result<(), DelayError> {
        if packet.len() > self.slot_size {
            return Err(DelayError::TooBig);
        }
        if self.len == self.meta.len() {
            return Err(DelayError::Full);
        }
        let due = match self.last_due() {
            Some(last) => due.max(last),
            None => due,
        };
        let i = (self.head + self.len) % self.meta.len();
        let (Some(buf), Some(meta)) = (self.bufs.get_mut(i), self.meta.get_mut(i)) else {
            return Err(DelayError::Full);
        };
        if let Some(dst) = buf.get_mut(..packet.len()) {
            dst.copy_from_slice(packet);
        }
        *meta = Some(Meta {
            len: packet.len(),
            due,
            tag,
        });
        self.len += 1;
        Ok(())
    }

    /// The due time of the newest packet.
    fn last_due(&self) -> Option<Instant> {
        let n = self.meta.len();
        let last = (self.head + self.len.checked_sub(1)?) % n;
        self.meta.get(last).copied().flatten().map(|m| m.due)
    }

    /// When the oldest packet is due (the forwarder's next wake-up).
    pub fn next_due(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        self.meta.get(self.head).copied().flatten().map(|m| m.due)
    }

    /// The oldest packet if it is due at `now`: copied into `out` (cut to
    /// `out.len()`), returning its length and tag.
    pub fn pop_due(&mut self, now: Instant, out: &mut [u8]) -> Option<(usize, T)> {
        if self.next_due()? > now {
            return None;
        }
        let meta = self.meta.get_mut(self.head)?.take()?;
        let n = meta.len.min(out.len());
        if let (Some(dst), Some(src)) = (
            out.get_mut(..n),
            self.bufs.get(self.head).and_then(|b| b.get(..n)),
        ) {
            dst.copy_from_slice(src);
        }
        self.head = (self.head + 1) % self.meta.len();
        self.len -= 1;
        Some((n, meta.tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_for_the_delay_in_order() {
        let t0 = Instant::now();
        let d = Duration::from_millis(20);
        let mut line: DelayLine<u8> = DelayLine::new(d, 2, 8);
        assert_eq!(line.push(t0, b"one", 1), Ok(()));
        assert_eq!(line.push(t0 + Duration::from_millis(5), b"two!", 2), Ok(()));
        assert_eq!(line.push(t0, b"three", 3), Err(DelayError::Full));
        assert_eq!(line.push(t0, b"far too long", 3), Err(DelayError::TooBig));
        assert_eq!(line.next_due(), Some(t0 + d));
        let mut out = [0u8; 8];
        assert_eq!(line.pop_due(t0 + Duration::from_millis(19), &mut out), None);
        assert_eq!(line.pop_due(t0 + d, &mut out), Some((3, 1)));
        assert_eq!(&out[..3], b"one");
        assert_eq!(line.pop_due(t0 + d, &mut out), None);
        assert_eq!(line.push(t0 + d, b"3", 3), Ok(()));
        assert_eq!(line.pop_due(t0 + d * 3, &mut out), Some((4, 2)));
        assert_eq!(&out[..4], b"two!");
        let mut small = [0u8; 0];
        assert_eq!(line.pop_due(t0 + d * 3, &mut small), Some((0, 3)));
        assert!(line.is_empty());
        assert_eq!(line.next_due(), None);
    }

    #[test]
    fn push_at_keeps_the_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut line: DelayLine<u8> = DelayLine::new(Duration::ZERO, 4, 8);
        assert_eq!(line.push_at(t0 + ms(5), b"a", 1), Ok(()));
        // Earlier than the one ahead: waits for it.
        assert_eq!(line.push_at(t0 + ms(2), b"b", 2), Ok(()));
        assert_eq!(line.push_at(t0 + ms(9), b"c", 3), Ok(()));
        let mut out = [0u8; 8];
        assert_eq!(line.pop_due(t0 + ms(4), &mut out), None);
        assert_eq!(line.pop_due(t0 + ms(5), &mut out), Some((1, 1)));
        assert_eq!(line.pop_due(t0 + ms(5), &mut out), Some((1, 2)));
        assert_eq!(line.pop_due(t0 + ms(8), &mut out), None);
        assert_eq!(line.next_due(), Some(t0 + ms(9)));
        assert_eq!(line.pop_due(t0 + ms(9), &mut out), Some((1, 3)));
    }
}
