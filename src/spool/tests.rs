//! Spool tests: round trips, acknowledgements, full policies, every kind of damage recovery
//! must survive, and a proptest of random operations and crashes against a simple model.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn options(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_owned(),
        max_bytes: 64 << 20,
        when_full: WhenFull::Block,
        fsync: Fsync::Interval(Duration::from_millis(100)),
    }
}

fn open(options: &SpoolOptions) -> (Spool, SpoolWriter, SpoolReader, OpenReport) {
    Spool::open(options.clone()).expect("the spool opens")
}

/// A payload that names its offset, so tests can check what came back.
fn payload(n: u64) -> Vec<u8> {
    format!("record-{n:08}-")
        .repeat(1 + (n % 5) as usize)
        .into_bytes()
}

fn append(writer: &mut SpoolWriter, n: u64, count: u32) -> std::ops::Range<u64> {
    push(writer, &payload(n), count)
}

/// Appends one record of `count` items.
fn push(writer: &mut SpoolWriter, payload: &[u8], count: u32) -> std::ops::Range<u64> {
    writer.append(&[Append { payload, count }]).expect("append")
}

fn read_all(reader: &mut SpoolReader) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let batch = reader.read(64, 1 << 20).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn assert_balanced(stats: &SpoolStats) {
    assert_eq!(
        stats.tail,
        stats.forwarded + stats.dropped_full + stats.dropped_corrupt + stats.pending,
        "{stats:?}"
    );
}

#[test]
fn records_come_back_in_order_and_acks_survive_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let options = options(tmp.path());
    let (spool, mut writer, mut reader, report) = open(&options);
    assert_eq!(report.stats, SpoolStats::default());
    for i in 0..10 {
        assert_eq!(append(&mut writer, i, 3), i * 3..i * 3 + 3);
    }
    let records = read_all(&mut reader);
    assert_eq!(records.len(), 10);
    for (i, r) in records.iter().enumerate() {
        assert_eq!((r.offset, r.count), (i as u64 * 3, 3));
        assert_eq!(r.payload, payload(i as u64));
    }
    // Acknowledged out of order: the head moves only over a contiguous prefix.
    reader.ack(3, 3);
    assert_eq!(spool.stats().head, 0);
    reader.ack(0, 3);
    assert_eq!(spool.stats().head, 6);
    assert_eq!(spool.stats().forwarded, 6);
    assert_eq!(spool.stats().pending, 24);
    assert_balanced(&spool.stats());
    writer.sync().unwrap();
    drop((spool, writer, reader));

    let (spool, _writer, mut reader, report) = open(&options);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!((report.stats.head, report.stats.tail), (6, 30));
    assert_eq!(report.stats.forwarded, 6);
    let again: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
    assert_eq!(again, (2..10).map(|i| i * 3).collect::<Vec<_>>());
    assert_balanced(&spool.stats());
}

#[test]
fn unacknowledged_records_are_read_again_after_a_crash_without_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let options = options(tmp.path());
    let (_spool, mut writer, mut reader, _) = open(&options);
    for i in 0..5 {
        append(&mut writer, i, 1);
    }
    assert_eq!(read_all(&mut reader).len(), 5);
    reader.ack(0, 1);
    // No sync: the ack is not durable, so the record is sent again (at least once).
    drop((writer, reader));
    let (_spool, _writer, mut reader, _) = open(&options);
    let offsets: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4]);
}

#[test]
fn rewind_reads_from_the_oldest_unacknowledged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (_spool, mut writer, mut reader, _) = open(&options(tmp.path()));
    for i in 0..4 {
        append(&mut writer, i, 2);
    }
    assert_eq!(read_all(&mut reader).len(), 4);
    reader.ack(0, 2);
    reader.rewind();
    let offsets: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [2, 4, 6]);
}

#[test]
fn acknowledged_segments_are_deleted_once_the_head_is_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20; // 128 KiB segments
    let (spool, mut writer, mut reader, _) = open(&options);
    let big = vec![7u8; 20_000];
    for _ in 0..40 {
        push(&mut writer, &big, 10);
    }
    assert!(segments(tmp.path()).len() >= 6);
    for r in read_all(&mut reader) {
        reader.ack(r.offset, r.count);
    }
    writer.sync().unwrap();
    assert_eq!(
        segments(tmp.path()).len(),
        1,
        "only the active segment stays"
    );
    let stats = spool.stats();
    assert_eq!((stats.pending, stats.forwarded), (0, 400));
    assert!(stats.bytes <= options.segment_bytes());
}

#[test]
fn drop_oldest_bounds_the_disk_and_counts_what_it_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20;
    options.when_full = WhenFull::DropOldest;
    let (spool, mut writer, mut reader, _) = open(&options);
    let big = vec![1u8; 10_000];
    for _ in 0..1000 {
        push(&mut writer, &big, 5);
        let on_disk: u64 = segments(tmp.path())
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert!(on_disk <= options.max_bytes, "{on_disk} bytes on disk");
    }
    let stats = spool.stats();
    assert!(stats.dropped_full > 0);
    assert_balanced(&stats);
    // What is left reads back, newest data intact and contiguous up to the tail.
    let records = read_all(&mut reader);
    assert_eq!(records.last().unwrap().end(), 5000);
    assert_eq!(
        records.iter().map(|r| u64::from(r.count)).sum::<u64>(),
        stats.pending
    );
}

#[test]
fn block_waits_for_room_until_an_ack_frees_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20;
    let (spool, mut writer, mut reader, _) = open(&options);
    let big = vec![1u8; 100_000];
    for _ in 0..9 {
        push(&mut writer, &big, 1);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let blocked = std::thread::spawn(move || {
        let mut n = 0;
        for _ in 0..3 {
            push(&mut writer, &big, 1);
            n += 1;
            tx.send(n).unwrap();
        }
        writer
    });
    // Nine records of 100,032 bytes and a tenth fit in 1 MiB; the eleventh must wait for an
    // acknowledgement.
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the writer should be blocked on a full spool"
    );
    assert_eq!(spool.stats().tail, 10);
    for r in read_all(&mut reader) {
        reader.ack(r.offset, r.count);
    }
    let writer = blocked.join().unwrap();
    let stats = spool.stats();
    assert_eq!((stats.tail, stats.dropped_full), (12, 0));
    assert!(stats.bytes <= options.max_bytes);
    drop(writer);
}

#[test]
fn close_wakes_a_writer_blocked_on_a_full_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20;
    let (spool, mut writer, _reader, _) = open(&options);
    let big = vec![1u8; 100_000];
    let blocked = std::thread::spawn(move || {
        loop {
            match writer.append(&[Append {
                payload: &big,
                count: 1,
            }]) {
                Ok(_) => continue,
                Err(err) => return err,
            }
        }
    });
    // Wait until the writer has filled the spool, then close it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while spool.stats().bytes + 100_032 <= options.max_bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool never filled"
        );
        std::thread::yield_now();
    }
    spool.close();
    assert!(matches!(blocked.join().unwrap(), SpoolError::Closed));
}

// ---- Damage: each case starts, keeps every intact record, and counts the rest. ----

/// Writes 3 segments of 20 one-item records each (offsets 0..60), syncs, and closes.
fn damaged_fixture() -> (tempfile::TempDir, SpoolOptions) {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20;
    let (_spool, mut writer, _reader, _) = open(&options);
    let p = vec![9u8; 6_000];
    for _ in 0..60 {
        push(&mut writer, &p, 1);
    }
    writer.sync().unwrap();
    assert!(segments(tmp.path()).len() >= 3);
    (tmp, options)
}

fn reopen_and_read(options: &SpoolOptions) -> (Vec<u64>, SpoolStats, OpenReport) {
    let (spool, _writer, mut reader, report) = open(options);
    let offsets = read_all(&mut reader).iter().map(|r| r.offset).collect();
    let stats = spool.stats();
    assert_balanced(&stats);
    (offsets, stats, report)
}

#[test]
fn a_torn_tail_loses_only_the_torn_record() {
    let (tmp, options) = damaged_fixture();
    let last = segments(tmp.path()).pop().unwrap();
    let len = fs::metadata(&last).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (offsets, stats, report) = reopen_and_read(&options);
    assert_eq!(offsets, (0..59).collect::<Vec<_>>());
    assert_eq!(
        stats.dropped_corrupt, 1,
        "the durable tail says one item is gone"
    );
    assert!(
        report.skipped.iter().any(|s| s.path == last),
        "{:?}",
        report.skipped
    );
}

#[test]
fn flipped_bytes_lose_only_the_records_they_hit() {
    let (tmp, options) = damaged_fixture();
    let first = segments(tmp.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    // One byte inside the third record's payload, one in the fifth record's header.
    let rec = record::HEADER_LEN + 6_000;
    bytes[2 * rec + 100] ^= 0x55;
    bytes[4 * rec + 10] ^= 0x01;
    fs::write(&first, &bytes).unwrap();
    let (offsets, stats, report) = reopen_and_read(&options);
    let expected: Vec<u64> = (0..60).filter(|&o| o != 2 && o != 4).collect();
    assert_eq!(offsets, expected);
    assert_eq!(stats.dropped_corrupt, 2);
    assert!(report.skipped.iter().all(|s| s.path == first));
    // The loss was written down: a second start finds the same records and counts nothing new.
    let (again, stats_again, report) = reopen_and_read(&options);
    assert_eq!(again, expected);
    assert_eq!(stats_again.dropped_corrupt, 2);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
}

#[test]
fn a_zeroed_segment_a_deleted_segment_and_a_foreign_file_are_survived() {
    let (tmp, options) = damaged_fixture();
    let files = segments(tmp.path());
    let zeroed_len = fs::metadata(&files[0]).unwrap().len() as usize;
    fs::write(&files[0], vec![0u8; zeroed_len]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    fs::write(tmp.path().join("notes.txt"), b"not a spool file").unwrap();
    fs::write(tmp.path().join("00000000000000000007.seg.bak"), b"junk").unwrap();
    let second_first: u64 = files[2]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (offsets, stats, report) = reopen_and_read(&options);
    assert_eq!(offsets, (second_first..60).collect::<Vec<_>>());
    assert_eq!(stats.dropped_corrupt, second_first);
    assert!(
        tmp.path().join("notes.txt").exists(),
        "foreign files are left alone"
    );
    let (again, stats_again, _) = reopen_and_read(&options);
    assert_eq!(
        (again, stats_again.dropped_corrupt),
        (offsets, second_first)
    );
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.what.contains("not a spool file"))
    );
}

#[test]
fn a_hole_at_the_start_of_a_later_segment_is_counted_once() {
    let (tmp, options) = damaged_fixture();
    let second = segments(tmp.path()).remove(1);
    let first_offset: u64 = second
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(&second).unwrap();
    bytes[record::HEADER_LEN + 10] ^= 0xff; // the segment's first record
    fs::write(&second, &bytes).unwrap();
    let (offsets, stats, _) = reopen_and_read(&options);
    assert!(!offsets.contains(&first_offset));
    assert_eq!(stats.dropped_corrupt, 1);
    for _ in 0..2 {
        let (again, stats, report) = reopen_and_read(&options);
        assert_eq!(again, offsets);
        assert_eq!(stats.dropped_corrupt, 1, "{:?}", report.skipped);
    }
}

/// Flips a byte in the first segment's third record and deletes the second segment.
fn damage_two_ways(dir: &Path) {
    let files = segments(dir);
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[2 * (record::HEADER_LEN + 6_000) + 100] ^= 0x55;
    fs::write(&files[0], &bytes).unwrap();
    fs::remove_file(&files[1]).unwrap();
}

#[test]
fn a_start_that_stops_before_storing_its_counts_leaves_them_to_the_next() {
    let (tmp, options) = damaged_fixture();
    damage_two_ways(tmp.path());
    let meta_path = tmp.path().join(meta::FILE_NAME);
    let before = fs::read(&meta_path).unwrap();
    let (offsets, stats, _) = reopen_and_read(&options);
    let lost = stats.dropped_corrupt;
    assert!(lost > 1, "a record and a segment: {stats:?}");
    // The crash: recovery's tombstones are on disk, the metadata store counting them is not.
    fs::write(&meta_path, &before).unwrap();
    let (again, stats, report) = reopen_and_read(&options);
    assert_eq!(again, offsets);
    assert_eq!(stats.dropped_corrupt, lost, "{:?}", report.skipped);
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.what.contains("counted now")),
        "{:?}",
        report.skipped
    );
    // Counted once, and not again.
    let (again, stats, report) = reopen_and_read(&options);
    assert_eq!(again, offsets);
    assert_eq!(stats.dropped_corrupt, lost);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
}

#[test]
fn tombstones_older_than_damaged_metadata_are_never_counted_later() {
    let (tmp, options) = damaged_fixture();
    damage_two_ways(tmp.path());
    let (offsets, before, _) = reopen_and_read(&options);
    // The metadata lost: counts restart from what the files show, tombstones included.
    fs::write(tmp.path().join(meta::FILE_NAME), vec![0x5a; 128]).unwrap();
    let (again, restarted, report) = reopen_and_read(&options);
    assert!(report.meta_damaged);
    assert_eq!(again, offsets);
    assert_eq!(restarted.dropped_corrupt, before.dropped_corrupt);
    for _ in 0..2 {
        let (again, stats, report) = reopen_and_read(&options);
        assert_eq!(again, offsets);
        assert_eq!(stats, restarted, "{:?}", report.skipped);
    }
}

#[test]
fn first_version_tombstones_stay_counted_until_the_counts_restart() {
    let (tmp, options) = damaged_fixture();
    damage_two_ways(tmp.path());
    let (offsets, before, _) = reopen_and_read(&options);
    // Every tombstone rewritten as the first version wrote them: no generation.
    let mut rewritten = 0;
    for path in segments(tmp.path()) {
        let bytes = fs::read(&path).unwrap();
        let (mut out, mut pos) = (Vec::new(), 0);
        while pos < bytes.len() {
            let Decoded::Record(h) = record::decode(&bytes[pos..]) else {
                panic!("recovery left only intact records")
            };
            match h.kind {
                Kind::Data => out.extend_from_slice(&bytes[pos..pos + h.total_len()]),
                Kind::Lost => {
                    record::encode(&Header { len: 0, ..h }, &[], &mut out);
                    rewritten += 1;
                }
            }
            pos += h.total_len();
        }
        fs::write(&path, &out).unwrap();
    }
    assert!(rewritten >= 2, "{rewritten}");
    let (again, stats, report) = reopen_and_read(&options);
    assert_eq!(again, offsets);
    assert_eq!(stats.dropped_corrupt, before.dropped_corrupt);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    // Counts restart from the files: those tombstones are counted like any other.
    fs::write(tmp.path().join(meta::FILE_NAME), vec![0x5a; 128]).unwrap();
    let (again, restarted, _) = reopen_and_read(&options);
    assert_eq!(again, offsets);
    assert_eq!(restarted.dropped_corrupt, before.dropped_corrupt);
}

#[test]
fn a_spool_in_use_by_another_opener_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let options = options(tmp.path());
    let first = open(&options);
    let err = Spool::open(options.clone())
        .err()
        .expect("a second opener is refused");
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    open(&options);
}

#[test]
fn a_segment_named_far_beyond_the_spool_is_left_alone() {
    let (tmp, options) = damaged_fixture();
    let stray = tmp.path().join("99999999999999999999.seg");
    fs::write(&stray, b"a stray copy").unwrap();
    let (offsets, stats, report) = reopen_and_read(&options);
    assert_eq!(offsets, (0..60).collect::<Vec<_>>());
    assert_eq!(stats.dropped_corrupt, 0);
    assert!(stray.exists());
    assert!(report.skipped.iter().any(|s| s.path == stray));
}

#[test]
fn a_damaged_metadata_file_still_recovers_every_record() {
    let (tmp, options) = damaged_fixture();
    fs::write(tmp.path().join(meta::FILE_NAME), vec![0u8; 128]).unwrap();
    let (offsets, stats, report) = reopen_and_read(&options);
    assert_eq!(offsets, (0..60).collect::<Vec<_>>());
    assert!(report.meta_damaged);
    assert_eq!(stats.pending, 60);
}

#[test]
fn a_segment_of_garbage_and_a_file_full_of_junk_headers_do_not_panic() {
    let (tmp, options) = damaged_fixture();
    let files = segments(tmp.path());
    let mut junk = Vec::new();
    for i in 0..50_000u32 {
        junk.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    }
    fs::write(&files[1], &junk).unwrap();
    let (offsets, stats, _) = reopen_and_read(&options);
    assert!(offsets.len() < 60);
    assert_eq!(stats.dropped_corrupt + offsets.len() as u64, 60);
    // Opened twice: nothing is counted twice.
    let (_, again, _) = reopen_and_read(&options);
    assert_eq!(again.dropped_corrupt, stats.dropped_corrupt);
}

#[test]
fn damage_that_appears_after_opening_is_skipped_by_the_reader() {
    let (tmp, options) = damaged_fixture();
    let (spool, _writer, mut reader, _) = open(&options);
    let first = segments(tmp.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    bytes[record::HEADER_LEN + 50] ^= 0xff;
    fs::write(&first, &bytes).unwrap();
    let offsets: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (1..60).collect::<Vec<_>>());
    assert_eq!(spool.stats().dropped_corrupt, 1);
    assert_balanced(&spool.stats());
    // A crash before the head passed the damage: recovery finds it again, counted once.
    drop((spool, _writer, reader));
    let (again, stats, _) = reopen_and_read(&options);
    assert_eq!(again, (1..60).collect::<Vec<_>>());
    assert_eq!(stats.dropped_corrupt, 1);
}

#[test]
fn damage_at_the_active_tail_loses_nothing_appended_after_the_read_began() {
    let tmp = tempfile::tempdir().unwrap();
    let options = options(tmp.path());
    let (spool, mut writer, mut reader, _) = open(&options);
    append(&mut writer, 0, 1);
    append(&mut writer, 1, 1);
    writer.sync().unwrap();
    let file = segments(tmp.path()).remove(0);
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff; // the second record's payload
    fs::write(&file, &bytes).unwrap();
    assert_eq!(reader.read(1, 1 << 20).unwrap().len(), 1);
    // What a read sees of the active segment, then a record appended before it handles the
    // damage it found there (the writer runs on another thread).
    let (limit, end) = {
        let state = spool.shared.lock();
        let segment = state.segments.back().unwrap();
        (segment.bytes, segment.end)
    };
    append(&mut writer, 2, 1);
    reader.skip_damage(0, limit, end).unwrap();
    let offsets: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [2]);
    assert_eq!(spool.stats().dropped_corrupt, 1);
    assert_balanced(&spool.stats());
}

// ---- The model: random appends, reads, acks, syncs and crashes. ----

#[derive(Debug, Clone)]
enum Op {
    Append { records: Vec<(u32, u16)> },
    Read { max: usize },
    Ack { nth: usize },
    Sync,
    Crash,
    Rewind,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((1u32..20, 0u16..3000), 1..4)
            .prop_map(|records| Op::Append { records }),
        3 => (1usize..10).prop_map(|max| Op::Read { max }),
        3 => (0usize..8).prop_map(|nth| Op::Ack { nth }),
        1 => Just(Op::Sync),
        1 => Just(Op::Crash),
        1 => Just(Op::Rewind),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Against a model (every appended record, and which were acknowledged durably): no
    /// unacknowledged record is ever lost across crashes, records come back in order, nothing
    /// is read twice between rewinds, and the counts balance.
    #[test]
    fn the_spool_matches_a_model_through_crashes(
        ops in prop::collection::vec(op(), 1..60),
        always in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut options = options(tmp.path());
        options.max_bytes = 4 << 20;
        options.fsync = if always { Fsync::Always } else { Fsync::Interval(Duration::from_millis(100)) };
        // offset → (count, payload) of every record ever appended.
        let mut model: BTreeMap<u64, (u32, Vec<u8>)> = BTreeMap::new();
        // Records read since the last rewind or crash, not yet acknowledged.
        let mut unacked: Vec<Record> = Vec::new();
        let mut acked_ever: u64 = 0;
        let (mut spool, mut writer, mut reader, _) = open(&options);
        let mut next_read = 0u64;
        for op in ops {
            match op {
                Op::Append { records } => {
                    let payloads: Vec<Vec<u8>> = records.iter().map(|&(_, len)| vec![(len % 251) as u8; len as usize]).collect();
                    let appends: Vec<Append<'_>> = records.iter().zip(&payloads).map(|(&(count, _), p)| Append { payload: p, count }).collect();
                    let range = writer.append(&appends).unwrap();
                    let mut offset = range.start;
                    for (&(count, _), p) in records.iter().zip(payloads) {
                        model.insert(offset, (count, p));
                        offset += u64::from(count);
                    }
                    prop_assert_eq!(offset, range.end);
                }
                Op::Read { max } => {
                    for r in reader.read(max, 1 << 20).unwrap() {
                        let (count, payload) = model.get(&r.offset).expect("a record the model knows");
                        prop_assert_eq!(*count, r.count);
                        prop_assert_eq!(payload, &r.payload);
                        prop_assert!(r.offset >= next_read, "read twice or out of order");
                        next_read = r.end();
                        unacked.push(r);
                    }
                }
                Op::Ack { nth } => {
                    if !unacked.is_empty() {
                        let r = unacked.remove(nth % unacked.len());
                        let before = spool.stats().forwarded;
                        reader.ack(r.offset, r.count);
                        acked_ever += spool.stats().forwarded - before;
                    }
                }
                Op::Sync => writer.sync().unwrap(),
                Op::Rewind => {
                    reader.rewind();
                    unacked.clear();
                    next_read = 0;
                }
                Op::Crash => {
                    drop((spool, writer, reader));
                    let opened = open(&options);
                    (spool, writer, reader) = (opened.0, opened.1, opened.2);
                    unacked.clear();
                    next_read = 0;
                    prop_assert!(opened.3.skipped.is_empty(), "{:?}", opened.3.skipped);
                }
            }
            let stats = spool.stats();
            assert_balanced(&stats);
            prop_assert_eq!(stats.dropped_corrupt + stats.dropped_full, 0);
            prop_assert!(stats.forwarded <= acked_ever);
        }
        // Every record not durably acknowledged is still there, in order.
        reader.rewind();
        let head = spool.stats().head;
        let left: Vec<u64> = read_all(&mut reader).iter().map(|r| r.offset).collect();
        let expected: Vec<u64> = model.range(head..).map(|(&o, _)| o).collect();
        prop_assert_eq!(left, expected);
    }
}

/// One record larger than half the spool fills it alone; once it is acknowledged the writer
/// must find room. The only segment is the active one, which is never deleted, and
/// `make_room` spun on `sync` forever (found by a defect hunt).
#[test]
fn block_finds_room_when_the_only_segment_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    options.max_bytes = 1 << 20;
    let (spool, mut writer, mut reader, _) = open(&options);
    let big = vec![1u8; 600_000];
    push(&mut writer, &big, 1);
    for r in read_all(&mut reader) {
        reader.ack(r.offset, r.count);
    }
    assert_eq!(spool.stats().pending, 0);
    assert_appends_in_time(writer, big, &spool);
    assert_balanced(&spool.stats());
}

/// The same after a restart with a smaller `max_bytes`: the one recovered segment is larger
/// than the new budget, and once acknowledged it must make way.
#[test]
fn a_smaller_max_bytes_after_a_restart_still_finds_room() {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = options(tmp.path());
    {
        let (_spool, mut writer, _reader, _) = open(&options);
        let p = vec![3u8; 100_000];
        for _ in 0..20 {
            push(&mut writer, &p, 1);
        }
        writer.sync().unwrap();
    }
    options.max_bytes = 1 << 20;
    let (spool, writer, mut reader, _) = open(&options);
    for r in read_all(&mut reader) {
        reader.ack(r.offset, r.count);
    }
    assert_appends_in_time(writer, b"small".to_vec(), &spool);
}

/// Appends `payload` on a thread of its own and asserts it is written within 10 s (a writer
/// that finds no room would wait, or spin, for good).
fn assert_appends_in_time(mut writer: SpoolWriter, payload: Vec<u8>, spool: &Spool) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let written = writer.append(&[Append {
            payload: &payload,
            count: 1,
        }]);
        let _ = tx.send(written.is_ok());
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the writer found no room in an acknowledged spool: {:?}",
        spool.stats()
    );
}

/// A segment that cannot be opened for a while (here a symlink loop, `ELOOP`; in the field
/// the process out of descriptors) is no damage: the read fails, nothing is counted lost or
/// skipped, and once it opens again every record comes back. Before, its records were counted
/// `spool_corrupt`, the head moved past them and the next sync deleted the file.
#[test]
fn a_segment_that_cannot_be_opened_for_a_while_loses_nothing() {
    let (tmp, options) = damaged_fixture();
    let (spool, _writer, mut reader, _) = open(&options);
    let first = segments(tmp.path()).remove(0);
    let aside = tmp.path().join("aside");
    fs::rename(&first, &aside).unwrap();
    std::os::unix::fs::symlink(&first, &first).unwrap();
    let err = reader
        .read(64, 1 << 20)
        .expect_err("the segment cannot be opened");
    assert_ne!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    assert_eq!(spool.stats().dropped_corrupt, 0, "{:?}", spool.stats());
    fs::remove_file(&first).unwrap();
    fs::rename(&aside, &first).unwrap();
    let records = read_all(&mut reader);
    assert_eq!(records.len(), 60, "every record, once the segment opens");
    assert_eq!(spool.stats().dropped_corrupt, 0);
}

/// A deleted or emptied `spool.meta` beside segments is metadata lost, not a new spool: the
/// counts restart and acknowledged records are sent again, and opening says so (it said
/// nothing; found by a defect hunt). A spool opened for the first time reports nothing.
#[test]
fn metadata_missing_beside_segments_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let options = options(tmp.path());
    let (_spool, _writer, _reader, report) = open(&options);
    assert!(!report.meta_damaged, "a new spool");
    drop((_spool, _writer, _reader));
    let (tmp, options) = damaged_fixture();
    for emptied in [false, true] {
        let path = tmp.path().join(meta::FILE_NAME);
        if emptied {
            fs::write(&path, b"").unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
        let (spool, _writer, mut reader, report) = open(&options);
        assert!(report.meta_damaged, "emptied {emptied}");
        // Nothing is lost for it: every record is there to be sent again.
        assert_eq!(read_all(&mut reader).len(), 60, "emptied {emptied}");
        assert_balanced(&spool.stats());
    }
}
