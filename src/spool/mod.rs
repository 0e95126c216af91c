//! The spool: a crash-safe, bounded, on-disk queue of opaque records between the worker stage
//! and the uplink's forwarder.
//!
//! It is a segmented append-only log in one directory: segment files named by their first
//! offset, each a run of checksummed [`record`]s, and a small two-slot [`meta`] file with the
//! counts that must survive a restart. Offsets count items (samples), not records or bytes,
//! so every count the spool keeps is in samples and a damaged range is measured exactly.
//!
//! - One [`SpoolWriter`] appends. With [`Fsync::Always`] every append is made durable
//!   (`fdatasync`) before it returns; several records appended together share one `fdatasync`
//!   (group commit). With [`Fsync::Interval`] the writer's owner calls [`SpoolWriter::sync`]
//!   on a timer, and a power loss can take the appends of the last interval.
//! - One [`SpoolReader`] reads records in order, and acknowledges them once delivered, in any
//!   order. The head (every item before it delivered or dropped) advances over acknowledged
//!   ranges; a segment is deleted once the metadata saying so is durable, so a crash can only
//!   resend acknowledged records (at least once), never lose unacknowledged ones.
//! - It is bounded by `max_bytes`: when full, [`WhenFull::Block`] makes the writer wait for
//!   acknowledgements, [`WhenFull::DropOldest`] deletes the oldest segment, counting its unsent
//!   items as dropped.
//! - [`Spool::open`] runs [`recovery`], which never fails on damaged data.
//!
//! The spool knows nothing of samples, MQTT or devices: records are bytes with an item count.
//!
//! Invariant, in items, across restarts while the metadata is intact:
//! `tail = forwarded + dropped_full + dropped_corrupt + pending`.

pub mod meta;
pub mod record;
pub mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::warn;

use self::meta::{Meta, MetaFile};
use self::record::{Decoded, HEADER_LEN, Header, Kind};
use self::recovery::{Recovered, segment_name};

/// What the writer does when the spool holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait until the forwarder frees room. Loses nothing in the spool; the wait backs up into
    /// the worker stage and the ring buffer, whose own overflow policy then applies.
    #[default]
    Block,
    /// Delete the oldest segment, counting its unsent items as `spool_full`. Keeps the newest
    /// data flowing during a long outage.
    DropOldest,
}

/// When appended records become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fdatasync` before an append returns: an append that returned survives power loss.
    Always,
    /// `fdatasync` every interval: power loss can take the appends of the last interval (a
    /// process crash loses nothing: the data is in the kernel's page cache).
    Interval(Duration),
}

/// How a spool is laid out and bounded.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// Most bytes of segment files.
    pub max_bytes: u64,
    /// What happens when full.
    pub when_full: WhenFull,
    /// When appends become durable.
    pub fsync: Fsync,
}

impl SpoolOptions {
    /// Segments roll at this size: an eighth of the budget, between 64 KiB and 64 MiB, so a
    /// full spool frees room in steps of at most an eighth.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(64 << 10, 64 << 20)
    }
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool was closed (shutdown) while the writer waited for room.
    #[error("the spool is closed")]
    Closed,
    /// A record is larger than the spool can ever hold.
    #[error("a record of {0} bytes does not fit in the spool")]
    TooLarge(usize),
    /// Writing or syncing failed.
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A copy of the spool's counters, in items unless named otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    /// Items ever appended (the next offset).
    pub tail: u64,
    /// Every item before this offset was forwarded or dropped.
    pub head: u64,
    /// Items appended and neither acknowledged nor dropped.
    pub pending: u64,
    /// Records appended and not yet acknowledged or dropped.
    pub pending_records: u64,
    /// Bytes of segment files.
    pub bytes: u64,
    /// Items acknowledged, ever.
    pub forwarded: u64,
    /// Items deleted unsent because the spool was full, ever.
    pub dropped_full: u64,
    /// Items lost to damaged files, ever.
    pub dropped_corrupt: u64,
    /// Append time of the oldest pending record, Unix milliseconds.
    pub oldest_pending_ms: Option<u64>,
}

struct Segment {
    first: u64,
    end: u64,
    bytes: u64,
    path: PathBuf,
}

struct State {
    segments: VecDeque<Segment>,
    meta: Meta,
    /// Settled ranges after the head (acknowledged out of order, or lost): start → range.
    settled: BTreeMap<u64, Settled>,
    /// Items in `settled`.
    settled_items: u64,
    /// Acknowledged items in `settled`: counted in `meta.forwarded`, but not yet stored as
    /// such, since a crash forgets ranges after the head and sends them again.
    settled_acked: u64,
    /// Items in `settled` found damaged by the reader: counted in `meta.dropped_corrupt`, but
    /// not yet stored, as recovery finds and counts them again after a crash.
    settled_lost: u64,
    /// (end offset, append time) of every record after the head, oldest first.
    times: VecDeque<(u64, u64)>,
    bytes: u64,
    /// The head as last made durable in the metadata; segments below it may be deleted.
    durable_head: u64,
    closed: bool,
}

impl State {
    fn stats(&self) -> SpoolStats {
        let pending = self.meta.tail - self.meta.head - self.settled_items;
        SpoolStats {
            tail: self.meta.tail,
            head: self.meta.head,
            pending,
            pending_records: self.times.len() as u64,
            bytes: self.bytes,
            forwarded: self.meta.forwarded,
            dropped_full: self.meta.dropped_full,
            dropped_corrupt: self.meta.dropped_corrupt,
            oldest_pending_ms: self.times.front().map(|&(_, t)| t),
        }
    }

    /// Marks `[from, to)` settled (`acked`: by an acknowledgement, else lost or dropped) and
    /// moves the head over everything settled at it. Returns how many items were newly
    /// settled (ranges settled twice count once).
    fn settle(&mut self, from: u64, to: u64, how: Settle) -> u64 {
        let from = from.max(self.meta.head);
        if to <= from {
            return 0;
        }
        let already = settled_between(&self.settled, from, to);
        let newly = to - from - already;
        if newly > 0 {
            // Absorb the ranges inside [from, to); a range reaching past it extends it.
            let mut end = to;
            let mut acked_items = if how == Settle::Acked { newly } else { 0 };
            let mut lost_items = if how == Settle::LostAtRead { newly } else { 0 };
            let starts: Vec<u64> = self
                .settled
                .range(..to)
                .filter(|(_, r)| r.end > from)
                .map(|(&s, _)| s)
                .collect();
            let mut start = from;
            for s in starts {
                let r = self.settled.remove(&s).expect("listed above");
                self.settled_items -= r.end - s;
                start = start.min(s);
                end = end.max(r.end);
                acked_items += r.acked;
                lost_items += r.lost;
            }
            self.settled_items += end - start;
            match how {
                Settle::Acked => self.settled_acked += newly,
                Settle::LostAtRead => self.settled_lost += newly,
                Settle::Dropped => {}
            }
            self.settled.insert(
                start,
                Settled {
                    end,
                    acked: acked_items,
                    lost: lost_items,
                },
            );
        }
        while let Some(r) = self.settled.remove(&self.meta.head) {
            self.settled_items -= r.end - self.meta.head;
            self.settled_acked -= r.acked;
            self.settled_lost -= r.lost;
            self.meta.head = r.end;
        }
        while self
            .times
            .front()
            .is_some_and(|&(end, _)| end <= self.meta.head)
        {
            self.times.pop_front();
        }
        newly
    }

    /// The metadata to store: acknowledgements after the head are left out, as a crash
    /// sends those items again.
    fn durable_meta(&self) -> Meta {
        Meta {
            forwarded: self.meta.forwarded - self.settled_acked,
            dropped_corrupt: self.meta.dropped_corrupt - self.settled_lost,
            ..self.meta
        }
    }
}

/// A settled range after the head.
#[derive(Debug, Clone, Copy)]
struct Settled {
    end: u64,
    /// Items in it settled by acknowledgements.
    acked: u64,
    /// Items in it the reader found damaged.
    lost: u64,
}

/// How a range was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Delivered and acknowledged.
    Acked,
    /// Deleted unsent (spool full).
    Dropped,
    /// Found damaged by the reader.
    LostAtRead,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when room appears, records are appended, or the spool closes.
    changed: Condvar,
    /// Wakes an async reader when records are appended or the spool closes.
    appended: tokio::sync::Notify,
    options: SpoolOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover from poisoning anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle for status and shutdown; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

/// What opening found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    /// What recovery skipped.
    pub skipped: Vec<recovery::Skipped>,
    /// Whether the metadata was damaged.
    pub meta_damaged: bool,
    /// The counters after recovery.
    pub stats: SpoolStats,
}

impl Spool {
    /// Opens the spool in `options.dir`, recovering whatever is there. Fails only if the
    /// directory itself cannot be created, listed or written.
    pub fn open(
        options: SpoolOptions,
    ) -> io::Result<(Spool, SpoolWriter, SpoolReader, OpenReport)> {
        fs::create_dir_all(&options.dir)?;
        let (mut meta_file, loaded) = MetaFile::open(&options.dir)?;
        let Recovered {
            segments,
            meta,
            holes,
            skipped,
            meta_damaged,
            generation,
        } = recovery::recover(&options.dir, loaded, meta_file.generation())?;
        meta_file.skip_to(generation);
        for s in &skipped {
            warn!(
                file = %s.path.display(),
                at = s.at,
                bytes = s.bytes,
                items = s.items,
                what = s.what,
                "Spool recovery skipped damaged data."
            );
        }
        if meta_damaged {
            warn!(
                dir = %options.dir.display(),
                "Spool metadata damaged; forwarded and dropped counts restart from zero."
            );
        }
        let times = segments
            .iter()
            .flat_map(|s| s.times.iter().copied())
            .collect();
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let settled_items = holes.iter().map(|(from, to)| to - from).sum();
        let holes = holes
            .into_iter()
            .map(|(from, end)| {
                let settled = Settled {
                    end,
                    acked: 0,
                    lost: 0,
                };
                (from, settled)
            })
            .collect();
        let segments: VecDeque<Segment> = segments
            .into_iter()
            .map(|s| Segment {
                first: s.first,
                end: s.end,
                bytes: s.bytes,
                path: s.path,
            })
            .collect();
        let state = State {
            segments,
            meta,
            settled: holes,
            settled_items,
            settled_acked: 0,
            settled_lost: 0,
            times,
            bytes,
            durable_head: meta.head,
            closed: false,
        };
        let stats = state.stats();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            appended: tokio::sync::Notify::new(),
            options,
        });
        let mut writer = SpoolWriter {
            shared: shared.clone(),
            meta_file,
            active: None,
            buf: Vec::new(),
            unsynced: false,
        };
        // Make the recovered state durable at once, so the counts of what recovery dropped are
        // never counted twice.
        writer.store_meta()?;
        let reader = SpoolReader {
            shared: shared.clone(),
            next: stats.head,
            cursor: None,
            buf: Vec::new(),
        };
        let report = OpenReport {
            skipped,
            meta_damaged,
            stats,
        };
        Ok((Spool { shared }, writer, reader, report))
    }

    /// The counters now.
    pub fn stats(&self) -> SpoolStats {
        self.shared.lock().stats()
    }

    /// Wakes a writer waiting for room and a reader waiting for records: they return
    /// [`SpoolError::Closed`] and `None`.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        self.shared.appended.notify_waiters();
    }

    /// Acknowledges a record read earlier: its items were delivered.
    pub fn ack(&self, offset: u64, count: u32) {
        ack(&self.shared, offset, count);
    }

    /// Settles a record read earlier that cannot be delivered (its payload is damaged): its
    /// items count as `dropped_corrupt`.
    pub fn reject(&self, offset: u64, count: u32) {
        let mut state = self.shared.lock();
        let newly = state.settle(offset, offset + u64::from(count), Settle::LostAtRead);
        state.meta.dropped_corrupt += newly;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Waits until the spool holds items at or after offset `next` that are not settled, or
    /// it closes (returns `false`).
    pub async fn wait_beyond(&self, next: u64) -> bool {
        loop {
            let notified = self.shared.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.shared.lock();
                if state.meta.tail > next.max(state.meta.head) {
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            notified.await;
        }
    }
}

struct Active {
    file: File,
    first: u64,
}

/// The one writer of a spool. Its calls block on disk I/O: use it from a blocking thread.
pub struct SpoolWriter {
    shared: Arc<Shared>,
    meta_file: MetaFile,
    active: Option<Active>,
    buf: Vec<u8>,
    unsynced: bool,
}

/// One record to append: an opaque payload holding `count` items.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// The bytes.
    pub payload: &'a [u8],
    /// Items in it, at least 1.
    pub count: u32,
}

impl SpoolWriter {
    /// Appends records in order and returns the offset range they took. With
    /// [`Fsync::Always`] they are durable when this returns. When the spool is full this
    /// waits for room ([`WhenFull::Block`]) or deletes the oldest segment
    /// ([`WhenFull::DropOldest`]).
    pub fn append(&mut self, records: &[Append<'_>]) -> Result<std::ops::Range<u64>, SpoolError> {
        let written_ms = unix_ms(SystemTime::now());
        let mut offset = self.shared.lock().meta.tail;
        let start = offset;
        self.buf.clear();
        let mut ends = Vec::with_capacity(records.len());
        for r in records {
            debug_assert!(r.count > 0, "a record holds at least one item");
            if r.payload.len() > record::MAX_PAYLOAD {
                return Err(SpoolError::TooLarge(r.payload.len()));
            }
            let header = Header {
                kind: Kind::Data,
                len: r.payload.len() as u32,
                count: r.count.max(1),
                offset,
                written_ms,
            };
            record::encode(&header, r.payload, &mut self.buf);
            offset = header.end();
            ends.push((offset, written_ms));
        }
        if self.buf.is_empty() {
            return Ok(start..start);
        }
        let len = self.buf.len() as u64;
        let segment_bytes = self.shared.options.segment_bytes();
        if len > self.shared.options.max_bytes.saturating_sub(segment_bytes) {
            return Err(SpoolError::TooLarge(self.buf.len()));
        }
        self.make_room(len)?;
        let active_len = self.shared.lock().segments.back().map_or(0, |s| s.bytes);
        if self.active.is_none() || active_len + len > segment_bytes && active_len > 0 {
            self.roll(start)?;
        }
        let active = self.active.as_mut().expect("roll opened a segment");
        let always = self.shared.options.fsync == Fsync::Always;
        let written = active.file.write_all(&self.buf).and_then(|()| {
            if always {
                timed_sync(&active.file)
            } else {
                Ok(())
            }
        });
        if let Err(err) = written {
            // Cut what part of the group reached the file, so the next append starts where
            // the spool believes the segment ends; if even that fails, the segment is closed
            // and the next append starts a new one.
            let known = self.shared.lock().segments.back().map_or(0, |s| s.bytes);
            if active.file.set_len(known).is_err() {
                self.active = None;
            }
            return Err(err.into());
        }
        if !always {
            self.unsynced = true;
        }
        {
            let mut state = self.shared.lock();
            let segment = state
                .segments
                .back_mut()
                .expect("the active segment is listed");
            segment.end = offset;
            segment.bytes += len;
            state.bytes += len;
            state.meta.tail = offset;
            state.times.extend(ends);
        }
        self.shared.appended.notify_waiters();
        self.shared.changed.notify_all();
        Ok(start..offset)
    }

    /// The most bytes one [`Self::append`] call should carry (records with their headers): one
    /// segment's worth. A larger group is refused or makes an oversized segment.
    pub fn max_append_bytes(&self) -> usize {
        self.shared.options.segment_bytes() as usize
    }

    /// Makes appended records durable, then the metadata (head, counts), then deletes
    /// segments that are no longer needed. Call it every `fsync` interval; cheap when idle.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            if let Some(active) = &self.active {
                timed_sync(&active.file)?;
            }
            self.unsynced = false;
        }
        let (head, durable_head) = {
            let state = self.shared.lock();
            (state.meta.head, state.durable_head)
        };
        if head != durable_head || self.meta_stale() {
            self.store_meta()?;
        }
        self.delete_settled()
    }

    /// Whether the durable tail moved since the metadata was stored; storing it lets recovery
    /// measure a tail that went missing.
    fn meta_stale(&self) -> bool {
        self.shared.lock().meta.tail != self.meta_file.stored().tail
    }

    fn store_meta(&mut self) -> io::Result<()> {
        let meta = self.shared.lock().durable_meta();
        self.meta_file.store(&meta)?;
        self.shared.lock().durable_head = meta.head;
        Ok(())
    }

    /// Deletes segments wholly before the durable head (never the active one).
    fn delete_settled(&mut self) -> io::Result<()> {
        let doomed: Vec<PathBuf> = {
            let mut state = self.shared.lock();
            let mut doomed = Vec::new();
            while state.segments.len() > 1
                && state
                    .segments
                    .front()
                    .is_some_and(|s| s.end <= state.durable_head)
            {
                let segment = state.segments.pop_front().expect("checked above");
                state.bytes -= segment.bytes;
                doomed.push(segment.path);
            }
            doomed
        };
        for path in &doomed {
            fs::remove_file(path)?;
        }
        if !doomed.is_empty() {
            self.shared.changed.notify_all();
        }
        Ok(())
    }

    /// Frees room for `len` more bytes, per the `when_full` policy.
    fn make_room(&mut self, len: u64) -> Result<(), SpoolError> {
        let max = self.shared.options.max_bytes;
        loop {
            let mut state = self.shared.lock();
            if state.bytes + len <= max {
                return Ok(());
            }
            if state.closed {
                return Err(SpoolError::Closed);
            }
            if state
                .segments
                .front()
                .is_some_and(|s| s.end <= state.meta.head)
            {
                // Acknowledged segments are waiting for durable metadata: store it now. The
                // active segment is never deleted, so when it is the only one (one large
                // record, or a segment recovered under a larger `max_bytes`) a new one starts
                // first: without it, this loop spun forever and the writer never wrote again.
                let only = state.segments.len() == 1;
                let tail = state.meta.tail;
                drop(state);
                if only {
                    self.roll(tail)?;
                }
                self.sync()?;
                continue;
            }
            match self.shared.options.when_full {
                WhenFull::Block if self.unsynced => {
                    // Waiting can take a whole outage: what was appended must not wait with it.
                    drop(state);
                    self.sync()?;
                }
                WhenFull::Block => {
                    // Woken by acknowledgements and by close; the timeout is a safety net.
                    let _ = self
                        .shared
                        .changed
                        .wait_timeout(state, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner());
                }
                WhenFull::DropOldest => {
                    if state.segments.len() == 1 {
                        // Only the active segment: start a new one so the old can go.
                        let tail = state.meta.tail;
                        drop(state);
                        self.roll(tail)?;
                        state = self.shared.lock();
                    }
                    let oldest = state.segments.front().expect("at least two segments");
                    let (from, to) = (oldest.first.max(state.meta.head), oldest.end);
                    let lost = state.settle(from, to, Settle::Dropped);
                    state.meta.dropped_full += lost;
                    drop(state);
                    if lost > 0 {
                        warn!(items = lost, "Spool full; oldest unsent items dropped.");
                    }
                    self.sync()?;
                }
            }
        }
    }

    /// Starts a new segment at offset `first`, after making the current one durable.
    fn roll(&mut self, first: u64) -> io::Result<()> {
        if let Some(active) = self.active.take() {
            if self.unsynced {
                active.file.sync_data()?;
                self.unsynced = false;
            }
            let mut state = self.shared.lock();
            if state
                .segments
                .back()
                .is_some_and(|s| s.first == active.first && s.bytes == 0)
            {
                // An empty segment is replaced, not kept.
                let empty = state.segments.pop_back().expect("checked above");
                drop(state);
                fs::remove_file(empty.path)?;
            }
        }
        let dir = &self.shared.options.dir;
        let path = dir.join(segment_name(first));
        let mut state = self.shared.lock();
        let resume = state
            .segments
            .back()
            .is_some_and(|s| s.first == first && s.path == path);
        drop(state);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if !resume {
            // The new name must survive a crash too.
            File::open(dir)?.sync_all()?;
            state = self.shared.lock();
            state.segments.push_back(Segment {
                first,
                end: first,
                bytes: 0,
                path,
            });
        }
        self.active = Some(Active { file, first });
        Ok(())
    }
}

fn settled_between(settled: &BTreeMap<u64, Settled>, from: u64, to: u64) -> u64 {
    settled
        .range(..to)
        .map(|(&s, r)| r.end.min(to).saturating_sub(s.max(from)))
        .sum()
}

/// A record read from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset of its first item.
    pub offset: u64,
    /// Items in it.
    pub count: u32,
    /// When it was appended, Unix milliseconds.
    pub written_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Record {
    /// The offset after its last item.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.count)
    }
}

struct Cursor {
    file: File,
    first: u64,
    pos: u64,
}

/// The one reader of a spool. Reads block on disk I/O (usually served from the page cache).
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// The offset of the next item to read.
    next: u64,
    cursor: Option<Cursor>,
    buf: Vec<u8>,
}

/// How much one read takes from the file at a time.
const READ_CHUNK: usize = 1 << 20;

impl SpoolReader {
    /// Reads up to `max_records` records (and about `max_bytes` of payload) after the last one
    /// read. Returns an empty list when there is nothing new, and an error when a segment that
    /// is still there cannot be opened (nothing is skipped; call again later).
    pub fn read(&mut self, max_records: usize, max_bytes: usize) -> io::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        while out.len() < max_records && taken < max_bytes {
            // Where to read, and how far the writer has written there.
            let (head, limit, first, end) = {
                let state = self.shared.lock();
                if self.next < state.meta.head {
                    self.next = state.meta.head;
                }
                let segment = state
                    .segments
                    .iter()
                    .find(|s| s.end > self.next && s.first <= self.next)
                    .or_else(|| state.segments.iter().find(|s| s.first > self.next));
                let Some(segment) = segment else { break };
                if self
                    .cursor
                    .as_ref()
                    .is_none_or(|c| c.first != segment.first)
                {
                    self.cursor = match File::open(&segment.path) {
                        Ok(file) => Some(Cursor {
                            file,
                            first: segment.first,
                            pos: 0,
                        }),
                        // A segment that is gone is lost. Any other failure to open it (the
                        // process out of descriptors, memory, a permission an operator
                        // changed) is no proof of damage: the read fails and is tried again,
                        // and the records stay (they were counted lost, and then deleted).
                        Err(err) if err.kind() == io::ErrorKind::NotFound => {
                            let (first, end) = (segment.first, segment.end);
                            drop(state);
                            self.lose_rest(first, end, &err);
                            continue;
                        }
                        // What was read before it is handed out first.
                        Err(_) if !out.is_empty() => break,
                        Err(err) => return Err(err),
                    };
                }
                (state.meta.head, segment.bytes, segment.first, segment.end)
            };
            let cursor = self.cursor.as_mut().expect("set above");
            if cursor.pos >= limit {
                break;
            }
            let mut want = ((limit - cursor.pos) as usize).min(READ_CHUNK);
            self.buf.resize(want.min(HEADER_LEN), 0);
            let peeked = cursor.file.read_exact_at(&mut self.buf, cursor.pos);
            if let Ok(()) = peeked
                && let Decoded::Record(h) = record::peek(&self.buf)
            {
                // A record larger than one chunk is read whole.
                want = want.max(h.total_len().min((limit - cursor.pos) as usize));
            }
            self.buf.resize(want, 0);
            if let Err(err) =
                peeked.and_then(|()| cursor.file.read_exact_at(&mut self.buf, cursor.pos))
            {
                // An unreadable segment (a bad sector) must not stall the uplink for good.
                self.lose_rest(first, end, &err);
                continue;
            }
            let mut at = 0usize;
            let mut progressed = false;
            while at < self.buf.len() && out.len() < max_records && taken < max_bytes {
                match record::decode(&self.buf[at..]) {
                    Decoded::Record(h) => {
                        let total = h.total_len();
                        // Tombstones are settled by recovery; only data is handed out.
                        if h.kind == Kind::Data && h.end() > self.next.max(head) {
                            out.push(Record {
                                offset: h.offset,
                                count: h.count,
                                written_ms: h.written_ms,
                                payload: self.buf[at + HEADER_LEN..at + total].to_vec(),
                            });
                            taken += h.len as usize;
                        }
                        self.next = self.next.max(h.end());
                        at += total;
                        progressed = true;
                    }
                    // The rest of this record is in the next chunk.
                    Decoded::Incomplete if progressed => break,
                    Decoded::Incomplete | Decoded::Invalid => {
                        // Damage that appeared after recovery (the disk, or someone else):
                        // skip to the next intact record, counting the items in between.
                        match self.skip_damage(at, limit, end) {
                            Ok(skipped) => at += skipped,
                            Err(err) => {
                                self.lose_rest(first, end, &err);
                                at = 0;
                            }
                        }
                        break;
                    }
                }
            }
            // A segment that could not be read has no cursor any more.
            if let Some(cursor) = self.cursor.as_mut() {
                cursor.pos += at as u64;
            }
        }
        Ok(out)
    }

    /// Counts the records of segment `first` not read yet (up to `end`) as lost, after an I/O
    /// error reading it, and moves on to the next segment.
    fn lose_rest(&mut self, first: u64, end: u64, err: &io::Error) {
        warn!(
            segment = first,
            error = %err,
            items = end.saturating_sub(self.next),
            "A spool segment cannot be read; its unread records are counted as lost."
        );
        let mut state = self.shared.lock();
        let lost = state.settle(self.next, end, Settle::LostAtRead);
        state.meta.dropped_corrupt += lost;
        drop(state);
        self.next = self.next.max(end);
        self.cursor = None;
        self.shared.changed.notify_all();
    }

    /// Skips damaged bytes at `at` in the read buffer; returns how many. `limit` and `end` are
    /// the segment's length in bytes and its end offset, as read together: when no intact
    /// record follows the damage, the items up to `end` are lost, and none appended after it.
    fn skip_damage(&mut self, at: usize, limit: u64, end: u64) -> io::Result<usize> {
        let cursor = self.cursor.as_ref().expect("reading");
        let start = cursor.pos + at as u64;
        let rest_len = (limit - start) as usize;
        let mut rest = vec![0u8; rest_len];
        cursor.file.read_exact_at(&mut rest, start)?;
        let resume = (1..rest.len()).find(
            |&i| matches!(record::decode(&rest[i..]), Decoded::Record(h) if h.end() > self.next),
        );
        let (skip, lost_to) = match resume {
            Some(i) => {
                let Decoded::Record(h) = record::decode(&rest[i..]) else {
                    unreachable!("found above")
                };
                (i, h.offset)
            }
            None => (rest.len(), end),
        };
        warn!(
            segment = cursor.first,
            at = start,
            items = lost_to.saturating_sub(self.next),
            "Spool record damaged after recovery; skipped."
        );
        if lost_to > self.next {
            let mut state = self.shared.lock();
            let lost = state.settle(self.next, lost_to, Settle::LostAtRead);
            state.meta.dropped_corrupt += lost;
            self.next = lost_to;
        }
        self.shared.changed.notify_all();
        Ok(skip)
    }

    /// Acknowledges a record read earlier: its items were delivered.
    pub fn ack(&self, offset: u64, count: u32) {
        ack(&self.shared, offset, count);
    }

    /// The offset after the last record read.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Reads again from the oldest unacknowledged record (after a reconnect).
    pub fn rewind(&mut self) {
        self.next = self.shared.lock().meta.head;
        self.cursor = None;
    }
}

fn ack(shared: &Shared, offset: u64, count: u32) {
    let end = offset + u64::from(count);
    let mut state = shared.lock();
    let newly = state.settle(offset, end, Settle::Acked);
    state.meta.forwarded += newly;
    drop(state);
    shared.changed.notify_all();
}

/// `fdatasync`, timed for the metrics.
fn timed_sync(file: &File) -> io::Result<()> {
    let started = std::time::Instant::now();
    let result = file.sync_data();
    crate::metrics::spool_fsync(started.elapsed());
    result
}

/// Unix time in milliseconds (0 before 1970): how records and timestamps are stamped.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How old the oldest pending record is, given its append time.
pub fn age_of(written_ms: u64) -> Duration {
    Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(written_ms))
}
