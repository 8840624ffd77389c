//! Message boundaries in a stream of tagged messages (`tag`, `int32 length`, body).
//!
//! [`Framer::next`] looks at the unconsumed bytes and says what comes next: a complete
//! message (small enough to hold, so it can be inspected), the start of a large one (passed
//! on as it arrives, never held in memory), more bytes of a large one, or the need for more
//! input. The caller consumes exactly the bytes each item reports.

use crate::{MAX_MESSAGE_LEN, ProtoError, be_u32};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// A whole message at the front of the input: `total` bytes, header included.
    Message { tag: u8, total: usize, body: &'a [u8] },
    /// The start of a message larger than the hold limit: its first `available` bytes (the
    /// header and part of the body) can be passed on now; the rest follows as `Continue`.
    LargeStart { tag: u8, total: usize, available: usize },
    /// `n` more bytes of the large message in progress.
    Continue(usize),
    /// Nothing complete yet.
    NeedMore,
}

#[derive(Debug, Clone)]
pub struct Framer {
    max_len: u32,
    hold_limit: usize,
    /// Bytes of a large message still to come.
    remaining: u64,
}

impl Framer {
    /// `max_len`: the longest message accepted (at most [`MAX_MESSAGE_LEN`]); `hold_limit`:
    /// messages up to this many bytes are returned whole.
    pub fn new(max_len: u32, hold_limit: usize) -> Framer {
        Framer { max_len: max_len.min(MAX_MESSAGE_LEN), hold_limit: hold_limit.max(5), remaining: 0 }
    }

    /// Whether the next byte starts a new message.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// What comes next in `input` (the unconsumed bytes).
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Result<Item<'a>, ProtoError> {
        if self.remaining > 0 {
            if input.is_empty() {
                return Ok(Item::NeedMore);
            }
            let n = (self.remaining.min(input.len() as u64)) as usize;
            self.remaining -= n as u64;
            return Ok(Item::Continue(n));
        }
        let (Some(&tag), Some(len)) = (input.first(), be_u32(input, 1)) else { return Ok(Item::NeedMore) };
        if len < 4 {
            return Err(ProtoError::TooShort { len, min: 4 });
        }
        if len > self.max_len {
            return Err(ProtoError::TooLong { len, max: self.max_len });
        }
        let total = len as usize + 1;
        if let Some(whole) = input.get(..total) {
            return Ok(Item::Message { tag, total, body: &whole[5..] });
        }
        if total <= self.hold_limit {
            return Ok(Item::NeedMore);
        }
        let available = input.len();
        self.remaining = (total - available) as u64;
        Ok(Item::LargeStart { tag, total, available })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend(((body.len() + 4) as u32).to_be_bytes());
        v.extend(body);
        v
    }

    #[test]
    fn small_messages_whole_large_ones_streamed() {
        let mut f = Framer::new(MAX_MESSAGE_LEN, 16);
        let mut input = msg(b'Z', b"I");
        input.extend(msg(b'd', &[7; 30]));
        assert_eq!(f.next(&input).unwrap(), Item::Message { tag: b'Z', total: 6, body: b"I" });
        let rest = &input[6..20];
        assert_eq!(f.next(rest).unwrap(), Item::LargeStart { tag: b'd', total: 35, available: 14 });
        assert!(!f.at_boundary());
        assert_eq!(f.next(&input[20..25]).unwrap(), Item::Continue(5));
        assert_eq!(f.next(&input[25..]).unwrap(), Item::Continue(16));
        assert!(f.at_boundary());
        assert_eq!(f.next(&[]).unwrap(), Item::NeedMore);
    }

    #[test]
    fn waits_for_small_messages_and_rejects_bad_lengths() {
        let mut f = Framer::new(1000, 64);
        let m = msg(b'Q', b"SELECT 1\0");
        assert_eq!(f.next(&m[..4]).unwrap(), Item::NeedMore);
        assert_eq!(f.next(&m[..m.len() - 1]).unwrap(), Item::NeedMore);
        assert!(matches!(f.next(&[b'Q', 0, 0, 0, 3]), Err(ProtoError::TooShort { .. })));
        assert!(matches!(f.next(&[b'Q', 0, 0, 4, 0]), Err(ProtoError::TooLong { len: 1024, max: 1000 })));
    }
}
