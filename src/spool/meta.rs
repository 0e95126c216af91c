//! The spool's metadata file, `spool.meta`: the counts that must survive a restart.
//!
//! Two 64-byte slots, written alternately, each with its own CRC32C and a generation number.
//! A write that is torn by a crash damages at most the slot being written, so the other one
//! (one generation older) is still valid; recovery takes the valid slot with the highest
//! generation. If both are damaged, recovery rebuilds what it can from the segments alone.
//!
//! ```text
//! offset  size  field
//!      0     4  crc32c of bytes 4 .. 64
//!      4     4  magic "THSP"
//!      8     1  version (1)
//!      9     7  reserved, zero
//!     16     8  generation
//!     24     8  head: every item before it was forwarded or dropped
//!     32     8  tail: the offset after the last item that was durable when this was written
//!     40     8  forwarded: items acknowledged by the uplink, ever
//!     48     8  dropped_full: items deleted unsent because the spool was full, ever
//!     56     8  dropped_corrupt: items lost to damaged files, ever
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The file's name inside the spool directory.
pub const FILE_NAME: &str = "spool.meta";

const SLOT_LEN: usize = 64;
const MAGIC: &[u8; 4] = b"THSP";
const VERSION: u8 = 1;

/// What the metadata records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Every item before this offset was forwarded or dropped.
    pub head: u64,
    /// The offset after the last durable item when the metadata was written.
    pub tail: u64,
    /// Items acknowledged by the uplink, ever.
    pub forwarded: u64,
    /// Items deleted unsent because the spool was full, ever.
    pub dropped_full: u64,
    /// Items lost to damaged files, ever.
    pub dropped_corrupt: u64,
}

fn encode(meta: &Meta, generation: u64) -> [u8; SLOT_LEN] {
    let mut slot = [0u8; SLOT_LEN];
    slot[4..8].copy_from_slice(MAGIC);
    slot[8] = VERSION;
    let fields = [
        generation,
        meta.head,
        meta.tail,
        meta.forwarded,
        meta.dropped_full,
        meta.dropped_corrupt,
    ];
    for (i, value) in fields.into_iter().enumerate() {
        slot[16 + 8 * i..24 + 8 * i].copy_from_slice(&value.to_le_bytes());
    }
    let crc = crc32c::crc32c(&slot[4..]);
    slot[..4].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode(slot: &[u8]) -> Option<(u64, Meta)> {
    if slot.len() < SLOT_LEN {
        return None;
    }
    let crc = u32::from_le_bytes(slot[..4].try_into().ok()?);
    if crc != crc32c::crc32c(&slot[4..SLOT_LEN]) || &slot[4..8] != MAGIC || slot[8] != VERSION {
        return None;
    }
    let field = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            slot[16 + 8 * i..24 + 8 * i].try_into().ok()?,
        ))
    };
    let meta = Meta {
        head: field(1)?,
        tail: field(2)?,
        forwarded: field(3)?,
        dropped_full: field(4)?,
        dropped_corrupt: field(5)?,
    };
    (meta.head <= meta.tail).then_some((field(0)?, meta))
}

/// Why the metadata could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// No metadata file: a new spool.
    Missing,
    /// Neither slot is valid.
    Damaged,
    /// The newest valid slot.
    Valid(Meta),
}

/// The open metadata file.
pub struct MetaFile {
    file: File,
    generation: u64,
    stored: Meta,
}

impl MetaFile {
    /// Opens (or creates) the metadata file in `dir` and reads it.
    pub fn open(dir: &Path) -> io::Result<(Self, Loaded)> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // One opener at a time: two gateways appending to and deleting from the same segments
        // would lose records and count their losses wrongly. The lock goes with the file.
        file.try_lock().map_err(|err| match err {
            std::fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                "the spool is in use by another process (its spool.meta is locked)",
            ),
            std::fs::TryLockError::Error(err) => err,
        })?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let slots = [bytes.get(..SLOT_LEN), bytes.get(SLOT_LEN..2 * SLOT_LEN)];
        let best = slots
            .into_iter()
            .flatten()
            .filter_map(decode)
            .max_by_key(|(generation, _)| *generation);
        let (generation, loaded) = match best {
            Some((generation, meta)) => (generation, Loaded::Valid(meta)),
            None if !existed || bytes.is_empty() => (0, Loaded::Missing),
            None => (0, Loaded::Damaged),
        };
        let stored = match loaded {
            Loaded::Valid(meta) => meta,
            Loaded::Missing | Loaded::Damaged => Meta::default(),
        };
        Ok((
            Self {
                file,
                generation,
                stored,
            },
            loaded,
        ))
    }

    /// Writes `meta` into the older slot and makes it durable.
    pub fn store(&mut self, meta: &Meta) -> io::Result<()> {
        // The generation moves on only once the slot is durable: a failed write is retried
        // into the same (older) slot, never into the one holding the last valid copy.
        let generation = self.generation + 1;
        let slot = encode(meta, generation);
        let at = (generation % 2) * SLOT_LEN as u64;
        self.file.write_all_at(&slot, at)?;
        self.file.sync_data()?;
        self.generation = generation;
        self.stored = *meta;
        Ok(())
    }

    /// The generation of the store that was loaded or made last (0 when there was none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the next store's generation at least `next`. Its slot stays the one the next store
    /// would have used anyway, so the newest durable slot is never the one overwritten.
    pub fn skip_to(&mut self, next: u64) {
        if next > self.generation + 1 {
            let skip = next - (self.generation + 1);
            self.generation += skip + skip % 2;
        }
    }

    /// What was last made durable.
    pub fn stored(&self) -> Meta {
        self.stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(head: u64) -> Meta {
        Meta {
            head,
            tail: head + 10,
            forwarded: head,
            dropped_full: 1,
            dropped_corrupt: 2,
        }
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_slot_falls_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut file, loaded) = MetaFile::open(dir).unwrap();
        assert_eq!(loaded, Loaded::Missing);
        file.store(&meta(5)).unwrap();
        file.store(&meta(9)).unwrap();
        drop(file); // one opener at a time
        assert_eq!(MetaFile::open(dir).unwrap().1, Loaded::Valid(meta(9)));
        // Damage the newer slot (generation 2 lives in slot 0): the older one is used.
        let path = dir.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(MetaFile::open(dir).unwrap().1, Loaded::Valid(meta(5)));
        // Both damaged: reported, never a panic.
        std::fs::write(&path, vec![0u8; 128]).unwrap();
        assert_eq!(MetaFile::open(dir).unwrap().1, Loaded::Damaged);
        std::fs::write(&path, b"x").unwrap();
        assert_eq!(MetaFile::open(dir).unwrap().1, Loaded::Damaged);
    }

    /// Opens the metadata in `dir`, stores `meta(n)` for each `n`, and closes it again (one
    /// opener at a time).
    fn store_all(dir: &Path, ns: &[u64]) {
        let (mut file, _) = MetaFile::open(dir).unwrap();
        for &n in ns {
            file.store(&meta(n)).unwrap();
        }
    }

    #[test]
    fn writing_after_a_fallback_never_overwrites_the_valid_slot_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        store_all(dir, &[1]);
        let (mut file, loaded) = MetaFile::open(dir).unwrap();
        assert_eq!(loaded, Loaded::Valid(meta(1)));
        file.store(&meta(2)).unwrap();
        drop(file);
        assert_eq!(MetaFile::open(dir).unwrap().1, Loaded::Valid(meta(2)));
    }

    #[test]
    fn skipped_generations_keep_the_slot_the_next_store_would_use() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        store_all(dir, &[1, 2]);
        for next in [3, 4, 10, 11] {
            let (mut file, _) = MetaFile::open(dir).unwrap();
            let before = file.generation();
            let slot_before = (before + 1) % 2;
            file.skip_to(next);
            assert!(file.generation() + 1 >= next, "{next}");
            assert_eq!((file.generation() + 1) % 2, slot_before, "{next}");
            file.store(&meta(next)).unwrap();
            drop(file);
            let (file, loaded) = MetaFile::open(dir).unwrap();
            assert_eq!(loaded, Loaded::Valid(meta(next)));
            assert!(file.generation() >= next);
            // The store before it is still whole in the other slot.
            let bytes = std::fs::read(dir.join(FILE_NAME)).unwrap();
            let older = (file.generation() + 1) % 2;
            let slot = &bytes[older as usize * SLOT_LEN..(older as usize + 1) * SLOT_LEN];
            assert_eq!(decode(slot).map(|(g, _)| g), Some(before), "{next}");
        }
        // A lower target changes nothing.
        let (mut file, _) = MetaFile::open(dir).unwrap();
        let before = file.generation();
        file.skip_to(1);
        assert_eq!(file.generation(), before);
    }
}
