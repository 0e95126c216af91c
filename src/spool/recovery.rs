//! Recovery: rebuilds the spool's state from whatever is in its directory.
//!
//! It never fails on damaged data. Each segment file is scanned record by record; a record whose
//! checksum fails, a torn tail, a file of zeros or garbage is skipped by resyncing at the next
//! byte where an intact record starts, and the items it held are counted as lost (offsets count
//! items, so the next intact record, the next segment's name or the metadata's durable tail
//! says exactly how many). Garbage after the last intact record is cut off so new records can be
//! appended. Files that are not segments are left alone and named in the report. Only I/O on the
//! directory itself (permission denied, a missing disk) is an error.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::meta::{self, Loaded, Meta};
use super::record::{self, Decoded, Header, Kind};

/// The widest gap between two segments that recovery counts as lost; a segment named further
/// away was not made by this spool.
const MAX_GAP: u64 = 1 << 40;

/// Segment files are named by their first offset: `00000000000000001234.seg`.
pub const SEGMENT_SUFFIX: &str = ".seg";

/// A segment's file name.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// One segment file as recovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Offset in the file's name.
    pub first: u64,
    /// Offset after the last intact record (`first` if none).
    pub end: u64,
    /// Bytes of intact records (the file is cut to this length).
    pub bytes: u64,
    /// The file.
    pub path: PathBuf,
    /// Append times of its intact records at or after the head: (end offset, Unix ms).
    pub times: Vec<(u64, u64)>,
}

/// Something recovery skipped, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Byte offset in the file where the damage starts.
    pub at: u64,
    /// Bytes skipped.
    pub bytes: u64,
    /// Items lost (0 when nothing was lost, e.g. an unsynced torn tail or a foreign file).
    pub items: u64,
    /// What was wrong.
    pub what: &'static str,
}

/// The spool's state as rebuilt from its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The segments, oldest first.
    pub segments: Vec<Segment>,
    /// The metadata's counts, with `head` and `tail` made consistent with the segments.
    pub meta: Meta,
    /// Lost ranges after the head (start → end), which count as settled when the head reaches
    /// them; their items are already in `meta.dropped_corrupt`.
    pub holes: BTreeMap<u64, u64>,
    /// What was skipped, for the log.
    pub skipped: Vec<Skipped>,
    /// Whether the metadata file was damaged (counts then restart from what the files show).
    pub meta_damaged: bool,
    /// The lowest generation the metadata store that makes this recovery durable may have: the
    /// one its tombstones name, and no lower than any tombstone found.
    pub generation: u64,
}

/// Rebuilds the spool's state from `dir` and the metadata read from it, whose store had
/// generation `generation` (0 when there is none).
///
/// Every loss it finds is counted once in `dropped_corrupt` and written down as a tombstone
/// record (a damaged segment is rewritten with its intact records and tombstones for the rest;
/// a missing range gets a segment of its own), so the next start does not count it again. The
/// tombstones name the metadata store that will count them, `generation + 1` (the caller
/// stores with at least [`Recovered::generation`]): when a start stops between writing them
/// and storing that, the next start finds tombstones newer than the metadata and counts them
/// itself.
pub fn recover(dir: &Path, loaded: Loaded, generation: u64) -> io::Result<Recovered> {
    let (mut meta, meta_known) = match loaded {
        Loaded::Valid(meta) => (meta, true),
        Loaded::Missing | Loaded::Damaged => (Meta::default(), false),
    };
    let mut skipped = Vec::new();
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        match parse_segment_name(&name) {
            Some(first) if entry.file_type()?.is_file() => files.push((first, entry.path())),
            _ if name == meta::FILE_NAME => {}
            // A rewrite that a crash interrupted: the original is still in place.
            _ if name.ends_with(".seg.tmp") => fs::remove_file(entry.path())?,
            _ => skipped.push(Skipped {
                path: entry.path(),
                at: 0,
                bytes: entry.metadata().map(|m| m.len()).unwrap_or(0),
                items: 0,
                what: "not a spool file; left alone",
            }),
        }
    }
    files.sort();

    let mut recovery = Recovery {
        dir,
        head: meta.head,
        segments: Vec::new(),
        holes: BTreeMap::new(),
        lost: 0,
        skipped,
        now_ms: super::unix_ms(std::time::SystemTime::now()),
        // Without metadata the counts restart from what the files show, tombstones included.
        counted: meta_known.then_some(generation),
        counted_by: generation + 1,
        newest_tag: 0,
    };
    // The next offset expected; starts at the head when the metadata is known, else at the
    // first segment (counts restart).
    let mut expected = if meta_known {
        meta.head
    } else {
        files.first().map_or(0, |(first, _)| *first)
    };
    for (first, path) in files {
        if first > expected && first - expected > MAX_GAP {
            // A name no append of this spool could have made (a flipped digit, a stray copy):
            // counting its gap as lost would be absurd, so the file is left alone.
            recovery.skipped.push(Skipped {
                path: path.clone(),
                at: 0,
                bytes: 0,
                items: 0,
                what: "a segment name far beyond the spool's offsets; left alone",
            });
            continue;
        }
        if first > expected {
            recovery.lost_range(expected, first, &path, "items missing before this segment");
            expected = first;
        }
        if let Err(err) = recovery.scan_segment(first, &path, &mut expected) {
            // A segment that cannot be read (a bad sector) must not stop the start: it is set
            // aside, and the items it held count as lost once the next segment shows how many.
            let aside = path.with_extension("seg.damaged");
            let _ = fs::rename(&path, &aside);
            recovery.skipped.push(Skipped {
                path: path.clone(),
                at: 0,
                bytes: 0,
                items: 0,
                what: if err.kind() == io::ErrorKind::NotFound {
                    "vanished while it was read"
                } else {
                    "cannot be read; renamed to *.seg.damaged"
                },
            });
        }
    }
    // Items the metadata had seen durable, but no file holds any more.
    if meta_known && meta.tail > expected {
        recovery.lost_range(expected, meta.tail, dir, "durable items missing at the end");
        expected = meta.tail;
    }
    let Recovery {
        segments,
        mut holes,
        lost,
        skipped,
        counted_by,
        newest_tag,
        ..
    } = recovery;
    meta.dropped_corrupt += lost;
    if !meta_known {
        meta.head = segments.first().map_or(expected, |s| s.first.min(expected));
    }
    meta.tail = expected;
    // The head passes over holes right at it.
    while let Some(end) = holes.remove(&meta.head) {
        meta.head = end;
    }
    // No metadata beside segments is metadata lost (deleted, or emptied), not a new spool.
    let meta_damaged = match loaded {
        Loaded::Damaged => true,
        Loaded::Missing => !segments.is_empty(),
        Loaded::Valid(_) => false,
    };
    Ok(Recovered {
        segments,
        meta,
        holes,
        skipped,
        meta_damaged,
        generation: counted_by.max(newest_tag),
    })
}

struct Recovery<'a> {
    dir: &'a Path,
    head: u64,
    segments: Vec<Segment>,
    holes: BTreeMap<u64, u64>,
    lost: u64,
    skipped: Vec<Skipped>,
    now_ms: u64,
    /// Tombstones naming a generation up to this one are in the loaded metadata's counts
    /// (`None`: there are no counts, every tombstone is counted).
    counted: Option<u64>,
    /// The generation the tombstones written now name.
    counted_by: u64,
    /// The highest generation any tombstone found names.
    newest_tag: u64,
}

impl Recovery<'_> {
    /// Counts `[from, to)` as lost and writes a segment of tombstones for it. When the
    /// tombstones cannot be written (a full disk), the loss is still counted and skipped in this
    /// run, only counted again at the next start.
    fn lost_range(&mut self, from: u64, to: u64, near: &Path, what: &'static str) {
        self.skipped.push(Skipped {
            path: near.to_owned(),
            at: 0,
            bytes: 0,
            items: to - from,
            what,
        });
        self.lost += to - from;
        if to <= self.head {
            return;
        }
        self.holes.insert(from, to);
        let mut bytes = Vec::new();
        record::encode_lost(from, to, self.now_ms, self.counted_by, &mut bytes);
        let path = self.dir.join(segment_name(from));
        match replace_file(self.dir, &path, &bytes) {
            Ok(()) => self.segments.push(Segment {
                first: from,
                end: to,
                bytes: bytes.len() as u64,
                path,
                times: Vec::new(),
            }),
            Err(err) => warn!(
                file = %path.display(),
                error = %err,
                "Cannot write down a loss in the spool; the next start counts it again."
            ),
        }
    }

    /// Scans one segment file, keeping its intact records. A damaged file is rewritten with
    /// its intact records and tombstones for what was lost; a file with nothing left after the
    /// head is deleted.
    fn scan_segment(&mut self, first: u64, path: &Path, expected: &mut u64) -> io::Result<()> {
        let entry = *expected;
        let bytes = fs::read(path)?;
        let mut pos = 0usize;
        let mut damaged = false;
        // The rewritten file, built only once damage is seen.
        let mut kept: Vec<(std::ops::Range<usize>, Header)> = Vec::new();
        let mut holes = Vec::new();
        while pos < bytes.len() {
            match record::decode(&bytes[pos..]) {
                Decoded::Record(header) if header.end() <= *expected => {
                    // Already forwarded (before the head) or a stale copy: dropped quietly.
                    pos += header.total_len();
                    damaged |= header.end() > self.head;
                }
                Decoded::Record(header) => {
                    if header.offset > *expected {
                        holes.push((*expected, header.offset));
                    }
                    *expected = header.end();
                    kept.push((pos..pos + header.total_len(), header));
                    pos += header.total_len();
                }
                Decoded::Incomplete | Decoded::Invalid => {
                    let resume = resync(&bytes, pos + 1, *expected);
                    let stop = resume.unwrap_or(bytes.len());
                    self.skipped.push(Skipped {
                        path: path.to_owned(),
                        at: pos as u64,
                        bytes: (stop - pos) as u64,
                        // Counted when the next intact record, segment or the durable tail
                        // shows where the hole ends.
                        items: 0,
                        what: if resume.is_some() {
                            "damaged bytes between intact records"
                        } else {
                            "damaged or torn tail"
                        },
                    });
                    damaged = true;
                    pos = stop;
                }
            }
        }
        for &(from, to) in &holes {
            self.skipped.push(Skipped {
                path: path.to_owned(),
                at: 0,
                bytes: 0,
                items: to - from,
                what: "items lost inside this segment",
            });
            self.lost += to - from;
            if to > self.head {
                self.holes.insert(from, to);
            }
        }
        kept.retain(|(_, h)| h.end() > self.head);
        if kept.is_empty() {
            // Nothing pending in it (holes in it, if any, are before the head).
            return fs::remove_file(path);
        }
        let mut out_bytes = bytes.len() as u64;
        if damaged || !holes.is_empty() {
            let mut out = Vec::with_capacity(bytes.len());
            // Tombstones from where this segment was expected to start, so a hole before its
            // first intact record is written down too.
            let mut at = entry.max(self.head);
            for (range, header) in &kept {
                if header.offset > at {
                    record::encode_lost(at, header.offset, self.now_ms, self.counted_by, &mut out);
                }
                out.extend_from_slice(&bytes[range.clone()]);
                at = header.end();
            }
            match replace_file(self.dir, path, &out) {
                Ok(()) => out_bytes = out.len() as u64,
                Err(err) => {
                    // No room for the rewrite: at least cut a damaged tail, which needs none.
                    let last = kept.last().map_or(0, |(range, _)| range.end);
                    if let Ok(file) = fs::OpenOptions::new().write(true).open(path)
                        && file.set_len(last as u64).is_ok()
                    {
                        out_bytes = last as u64;
                    }
                    warn!(
                        file = %path.display(),
                        error = %err,
                        "Cannot rewrite a damaged spool segment; the next start counts its loss again."
                    );
                }
            }
        }
        let mut times = Vec::new();
        for (range, header) in &kept {
            match header.kind {
                Kind::Data => times.push((header.end(), header.written_ms)),
                Kind::Lost => {
                    self.holes.insert(header.offset, header.end());
                    let tag = record::lost_counted_by(&bytes[range.clone()]);
                    self.newest_tag = self.newest_tag.max(tag);
                    let what = match self.counted {
                        None => "a loss written down earlier; counted again as counts restart",
                        // Written by a start that stopped before it stored its counts.
                        Some(counted) if tag > counted => {
                            "a loss written down by a start that stopped before storing its \
                             counts; counted now"
                        }
                        Some(_) => continue,
                    };
                    self.lost += u64::from(header.count);
                    self.skipped.push(Skipped {
                        path: path.to_owned(),
                        at: range.start as u64,
                        bytes: 0,
                        items: u64::from(header.count),
                        what,
                    });
                }
            }
        }
        self.segments.push(Segment {
            first,
            end: *expected,
            bytes: out_bytes,
            path: path.to_owned(),
            times,
        });
        Ok(())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync the directory.
fn replace_file(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("seg.tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// The next position at or after `from` where an intact record for offset `expected` or later
/// starts.
fn resync(bytes: &[u8], from: usize, expected: u64) -> Option<usize> {
    (from..bytes.len()).find(
        |&at| matches!(record::decode(&bytes[at..]), Decoded::Record(h) if h.end() > expected),
    )
}
