//! The spool's record layout: a fixed header with a CRC32C, then an opaque payload.
//!
//! ```text
//! offset  size  field
//!      0     4  crc32c of bytes 4 .. 32 + len (everything after this field)
//!      4     1  version (1)
//!      5     1  kind: 0 data, 1 lost (a tombstone for items recovery could not save; len 8:
//!                 the generation of the metadata store that counts them, or 0 as written by
//!                 the first spool version, which counted them already)
//!      6     2  reserved, zero
//!      8     4  len: payload bytes
//!     12     4  count: items in the payload (samples), at least 1
//!     16     8  offset: the spool offset of the record's first item
//!     24     8  written: Unix time in milliseconds when the record was appended
//!     32   len  payload
//! ```
//!
//! All integers are little-endian. Offsets count items, not bytes: a record holding `count`
//! items at `offset` is followed by the record at `offset + count`, so a hole left by a damaged
//! record is measured exactly in items by the next intact one. Because the checksum covers the
//! length and the offset, a flipped bit anywhere fails the record, and recovery can resync by
//! trying every byte position until a header checks out again.

/// Bytes before the payload.
pub const HEADER_LEN: usize = 32;

/// The only record version so far.
pub const VERSION: u8 = 1;

/// Largest payload accepted, on write and when reading a header (a bigger length is damage).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Items: an opaque payload.
    Data,
    /// A tombstone written by recovery for items that were lost, so that the loss is counted
    /// once, not again at every start. Its payload is the generation of the metadata store that
    /// counts the loss ([`lost_counted_by`]).
    Lost,
}

/// A record's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What it holds.
    pub kind: Kind,
    /// Payload length in bytes.
    pub len: u32,
    /// Items in the payload.
    pub count: u32,
    /// Spool offset of the first item.
    pub offset: u64,
    /// Append time, Unix milliseconds.
    pub written_ms: u64,
}

impl Header {
    /// The offset after the record's last item.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.count)
    }

    /// Bytes the whole record takes on disk.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.len as usize
    }
}

/// Appends one record to `out`.
pub fn encode(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!(header.len as usize, payload.len());
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(VERSION);
    out.push(match header.kind {
        Kind::Data => 0,
        Kind::Lost => 1,
    });
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&header.len.to_le_bytes());
    out.extend_from_slice(&header.count.to_le_bytes());
    out.extend_from_slice(&header.offset.to_le_bytes());
    out.extend_from_slice(&header.written_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// What is at the start of `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// An intact record.
    Record(Header),
    /// Too few bytes for the record that seems to start here (a torn tail, or more to come).
    Incomplete,
    /// No valid record starts here.
    Invalid,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Parses the header only, without the checksum: enough to know how long the record is.
pub fn peek(bytes: &[u8]) -> Decoded {
    if bytes.len() < HEADER_LEN {
        return Decoded::Incomplete;
    }
    let kind = match bytes[5] {
        0 => Kind::Data,
        1 => Kind::Lost,
        _ => return Decoded::Invalid,
    };
    let header = Header {
        kind,
        len: u32_at(bytes, 8),
        count: u32_at(bytes, 12),
        offset: u64_at(bytes, 16),
        written_ms: u64_at(bytes, 24),
    };
    if bytes[4] != VERSION
        || bytes[6..8] != [0; 2]
        || (kind == Kind::Lost && header.len != 0 && header.len != 8)
        || header.count == 0
        || header.len as usize > MAX_PAYLOAD
        || header.offset.checked_add(u64::from(header.count)).is_none()
    {
        return Decoded::Invalid;
    }
    Decoded::Record(header)
}

/// Appends tombstones covering the lost items `[from, to)`, to be counted by the metadata
/// store of generation `counted_by`: until a store of that generation is durable, the next
/// start counts them (recovery writes them first and stores the counts second, so a crash in
/// between neither loses the count nor counts it twice).
pub fn encode_lost(from: u64, to: u64, written_ms: u64, counted_by: u64, out: &mut Vec<u8>) {
    let mut at = from;
    while at < to {
        let count = (to - at).min(u64::from(u32::MAX)) as u32;
        let header = Header {
            kind: Kind::Lost,
            len: 8,
            count,
            offset: at,
            written_ms,
        };
        encode(&header, &counted_by.to_le_bytes(), out);
        at += u64::from(count);
    }
}

/// The metadata generation that counts a tombstone, from the whole record (header and
/// payload); 0 for the first version's tombstones without a payload, which were counted when
/// they were written.
pub fn lost_counted_by(record: &[u8]) -> u64 {
    record
        .get(HEADER_LEN..HEADER_LEN + 8)
        .map_or(0, |b| u64_at(b, 0))
}

/// Parses and checks the record at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Decoded {
    match peek(bytes) {
        Decoded::Record(header) => {
            let total = header.total_len();
            if bytes.len() < total {
                return Decoded::Incomplete;
            }
            if crc32c::crc32c(&bytes[4..total]) != u32_at(bytes, 0) {
                return Decoded::Invalid;
            }
            Decoded::Record(header)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let header = Header {
            kind: Kind::Data,
            len: payload.len() as u32,
            count: 3,
            offset,
            written_ms: 1_700_000_000_000,
        };
        encode(&header, payload, &mut out);
        out
    }

    #[test]
    fn a_record_round_trips() {
        let bytes = record(42, b"hello");
        assert_eq!(bytes.len(), HEADER_LEN + 5);
        let Decoded::Record(h) = decode(&bytes) else {
            panic!("not decoded")
        };
        assert_eq!((h.offset, h.count, h.len, h.end()), (42, 3, 5, 45));
        assert_eq!(&bytes[HEADER_LEN..], b"hello");
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = record(7, b"payload bytes");
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert_ne!(
                decode(&damaged),
                decode(&bytes),
                "bit {i} flipped went unnoticed"
            );
            assert!(!matches!(decode(&damaged), Decoded::Record(_)), "bit {i}");
        }
    }

    #[test]
    fn short_input_is_incomplete_and_zeros_are_invalid() {
        let bytes = record(7, b"abc");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
        assert_eq!(decode(&[0; 64]), Decoded::Invalid);
    }

    #[test]
    fn tombstones_carry_the_generation_that_counts_them() {
        let mut out = Vec::new();
        encode_lost(10, 15, 1_700_000_000_000, 42, &mut out);
        let Decoded::Record(h) = decode(&out) else {
            panic!("not decoded")
        };
        assert_eq!((h.kind, h.offset, h.count, h.len), (Kind::Lost, 10, 5, 8));
        assert_eq!(h.total_len(), out.len());
        assert_eq!(lost_counted_by(&out), 42);
        // The first version's tombstones have no payload: counted when written.
        let mut old = Vec::new();
        let header = Header {
            kind: Kind::Lost,
            len: 0,
            count: 5,
            offset: 10,
            written_ms: 1,
        };
        encode(&header, &[], &mut old);
        assert!(matches!(decode(&old), Decoded::Record(h) if h.kind == Kind::Lost));
        assert_eq!(lost_counted_by(&old), 0);
        // Any other payload length is damage.
        let mut odd = Vec::new();
        encode(&Header { len: 3, ..header }, b"abc", &mut odd);
        assert_eq!(decode(&odd), Decoded::Invalid);
    }
}
