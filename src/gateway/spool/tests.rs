//! Model and damage tests of the spool: what is appended (and synced) is read
//! back in order exactly once, whatever happens to the files in between.
//!
//! Over 500 lines: the model test and one test per kind of damage, sharing the
//! helpers at the top.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;

/// A unique empty directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "iot-spool-{label}-{}-{n}-{}",
            std::process::id(),
            now_ms()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn opts(dir: &Path, segment_bytes: u64, max_bytes: u64, on_full: OnFull) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes,
        segment_bytes,
        on_full,
    }
}

fn reading(n: u64) -> Record {
    Record {
        received_ms: 1_700_000_000_000 + n as i64,
        ts_ms: Some(1_700_000_000_000 + n as i64),
        seq: Some(n),
        key: Some(format!("dev-{}", n % 7).into_bytes()),
        headers: vec![("schema".into(), b"1".as_slice().into())],
        value: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat((n % 50) as usize)).into_bytes(),
        ..Record::default()
    }
}

/// The `seq` (= identity) of every record the reader yields now.
fn read_all(r: &mut SpoolReader) -> Vec<u64> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if r.read(64, &mut batch).unwrap() == 0 {
            return out;
        }
        for rec in &batch {
            let seq = rec.seq.unwrap();
            assert_eq!(
                rec,
                &Record {
                    offset: rec.offset,
                    ..reading(seq)
                },
                "content intact"
            );
            out.push(seq);
        }
    }
}

fn append(s: &mut Spool, ns: impl IntoIterator<Item = u64>) -> Appended {
    let mut recs: Vec<Record> = ns.into_iter().map(reading).collect();
    let a = s.append(&mut recs).unwrap();
    s.sync().unwrap();
    s.publish();
    a
}

fn dir_bytes(dir: &Path) -> u64 {
    list_segments(dir)
        .unwrap()
        .iter()
        .map(|(_, p)| fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn random_append_read_checkpoint_reopen_matches_a_model() {
    for seed in 1..=20u64 {
        let d = TempDir::new("model");
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let o = opts(&d.0, 600 + rng.below(3000), u64::MAX, OnFull::Block);
        let (mut s, mut r, rec) = Spool::open(o.clone()).unwrap();
        assert_eq!(rec.pending_records, 0);
        // Model: records appended and not yet acknowledged, and the next to read.
        let mut unacked: Vec<u64> = Vec::new();
        let mut read_upto = 0usize; // index into unacked
        let mut n = 0u64;
        for _ in 0..300 {
            match rng.below(10) {
                0..=3 => {
                    let k = 1 + rng.below(20);
                    append(&mut s, n..n + k);
                    unacked.extend(n..n + k);
                    n += k;
                }
                4..=6 => {
                    let mut batch = Vec::new();
                    let got = r.read(1 + rng.below(30) as usize, &mut batch).unwrap();
                    let want = &unacked[read_upto..read_upto + got];
                    let seqs: Vec<u64> = batch.iter().map(|x| x.seq.unwrap()).collect();
                    assert_eq!(seqs, want, "seed {seed}: reads follow the model");
                    read_upto += got;
                }
                7 | 8 if read_upto > 0 => {
                    // Kafka acknowledged a prefix of what was read.
                    let k = 1 + rng.below(read_upto as u64) as usize;
                    let acked_seq = unacked[k - 1];
                    // Offsets equal seqs here: one spool, appended in order.
                    s.checkpoint(acked_seq + 1).unwrap();
                    unacked.drain(..k);
                    read_upto -= k;
                }
                _ => {
                    drop((s, r));
                    let (s2, r2, rec) = Spool::open(o.clone()).unwrap();
                    assert_eq!(rec.pending_records, unacked.len() as u64, "seed {seed}");
                    assert_eq!(rec.truncated_bytes + rec.corrupt_records, 0);
                    assert!(!rec.checkpoint_invalid);
                    s = s2;
                    r = r2;
                    read_upto = 0; // everything unacknowledged is read again
                }
            }
            assert_eq!(s.bytes(), dir_bytes(&d.0), "seed {seed}: byte accounting");
        }
        let rest = read_all(&mut r);
        assert_eq!(rest, unacked[read_upto..], "seed {seed}");
    }
}

#[test]
fn a_torn_tail_cut_at_every_byte_keeps_the_complete_records() {
    let d = TempDir::new("torn");
    let o = opts(&d.0, 1 << 20, u64::MAX, OnFull::Block);
    let (mut s, _, _) = Spool::open(o.clone()).unwrap();
    append(&mut s, 0..5);
    let seg = list_segments(&d.0).unwrap().pop().unwrap().1;
    drop(s);
    let full = fs::read(&seg).unwrap();
    // Where each record ends.
    let mut ends = vec![SEGMENT_HEADER_LEN];
    while let Ok((_, n)) = format::decode(&full[*ends.last().unwrap()..]) {
        ends.push(ends.last().unwrap() + n);
    }
    assert_eq!(ends.len(), 6);
    let keep = TempDir::new("torn-copy");
    for cut in ends[2]..full.len() {
        let _ = fs::remove_dir_all(&keep.0);
        fs::create_dir_all(&keep.0).unwrap();
        fs::write(keep.0.join(seg.file_name().unwrap()), &full[..cut]).unwrap();
        let (_, mut r, rec) = Spool::open(opts(&keep.0, 1 << 20, u64::MAX, OnFull::Block)).unwrap();
        let complete = ends.iter().filter(|&&e| e <= cut).count() as u64 - 1;
        let boundary = ends[complete as usize];
        assert_eq!(rec.truncated_bytes, (cut - boundary) as u64, "cut {cut}");
        assert_eq!(
            read_all(&mut r),
            (0..complete).collect::<Vec<_>>(),
            "cut {cut}"
        );
    }
}

#[test]
fn zero_filled_and_garbage_tails_are_truncated() {
    for tail in [
        vec![0u8; 4096],
        (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect(),
    ] {
        let d = TempDir::new("tail");
        let o = opts(&d.0, 1 << 20, u64::MAX, OnFull::Block);
        let (mut s, _, _) = Spool::open(o.clone()).unwrap();
        append(&mut s, 0..10);
        drop(s);
        let seg = list_segments(&d.0).unwrap().pop().unwrap().1;
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&tail).unwrap();
        drop(f);
        let (mut s, mut r, rec) = Spool::open(o.clone()).unwrap();
        assert_eq!(rec.truncated_bytes, tail.len() as u64);
        assert_eq!(rec.corrupt_records, 0);
        assert_eq!(read_all(&mut r), (0..10).collect::<Vec<_>>());
        // Appending goes on after the repaired data.
        append(&mut s, 10..12);
        assert_eq!(read_all(&mut r), vec![10, 11]);
    }
}

/// Issue 23: a 64 MiB garbage tail (a disk that returned junk after a power
/// cut) took 78 s to recover, a CRC over up to 16 MiB tried at almost every
/// byte. Resync now pays a CRC only where a record can plausibly start: count
/// those in the garbage (the work), and recover it whole.
#[test]
fn a_64_mib_random_tail_is_resolved_with_almost_no_checksums() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let garbage: Vec<u8> = (0..(64usize << 20) / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let plausible = (0..garbage.len())
        .filter(|&p| format::plausible_start(&garbage[p..], 10, u64::MAX))
        .count();
    assert!(plausible <= 2, "{plausible} positions would pay a CRC");
    let d = TempDir::new("garbage");
    let o = opts(&d.0, 1 << 30, u64::MAX, OnFull::Block);
    let (mut s, _, _) = Spool::open(o.clone()).unwrap();
    append(&mut s, 0..10);
    drop(s);
    let seg = list_segments(&d.0).unwrap().pop().unwrap().1;
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&garbage).unwrap();
    drop(f);
    let t = std::time::Instant::now();
    let (_, mut r, rec) = Spool::open(o).unwrap();
    eprintln!(
        "recovered a 64 MiB garbage tail in {:?} (debug build)",
        t.elapsed()
    );
    assert_eq!(rec.truncated_bytes, garbage.len() as u64);
    assert_eq!(read_all(&mut r), (0..10).collect::<Vec<_>>());
}

/// Every record the encoder writes passes the resync pre-check.
#[test]
fn every_encoded_record_is_a_plausible_start() {
    for n in 0..200 {
        let mut r = reading(n);
        if n % 3 == 0 {
            (r.key, r.seq, r.ts_ms) = (None, None, None);
        }
        r.dlq = n % 2 == 0;
        let mut buf = Vec::new();
        format::encode(&r, n, &mut buf);
        assert!(format::plausible_start(&buf, n, n + 1), "{n}");
        assert!(!format::plausible_start(&buf, n + 1, u64::MAX), "{n}");
    }
}

/// Appends 0..n in batches of 5 with small segments: several sealed ones.
fn sealed_segments(dir: &Path, n: u64) -> Vec<(u64, PathBuf)> {
    let (mut s, _, _) = Spool::open(opts(dir, 800, u64::MAX, OnFull::Block)).unwrap();
    for b in (0..n).step_by(5) {
        append(&mut s, b..(b + 5).min(n));
    }
    list_segments(dir).unwrap()
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_loses_one_record_and_quarantines_the_original() {
    let d = TempDir::new("bitrot");
    let segs = sealed_segments(&d.0, 60);
    assert!(segs.len() >= 4, "{segs:?}");
    let (base, path) = &segs[1];
    let mut data = fs::read(path).unwrap();
    // Flip a bit inside the second record's value.
    let (_, n1) = format::decode(&data[SEGMENT_HEADER_LEN..]).unwrap();
    let victim = SEGMENT_HEADER_LEN + n1 + 40;
    data[victim] ^= 0x10;
    fs::write(path, &data).unwrap();
    let (_, mut r, rec) = Spool::open(opts(&d.0, 800, u64::MAX, OnFull::Block)).unwrap();
    assert_eq!(rec.corrupt_records, 1);
    assert_eq!(rec.quarantined_segments, 1);
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(fs::read_dir(d.0.join("quarantine")).unwrap().count(), 1);
    let want: Vec<u64> = (0..60).filter(|&x| x != base + 1).collect();
    assert_eq!(read_all(&mut r), want);
}

#[test]
fn a_segment_with_a_bad_header_or_missing_is_skipped_and_counted() {
    let d = TempDir::new("badhdr");
    let segs = sealed_segments(&d.0, 60);
    let lost = segs[2].0 - segs[1].0;
    fs::write(&segs[1].1, b"not a segment at all, just garbage bytes....").unwrap();
    let (_, mut r, rec) = Spool::open(opts(&d.0, 800, u64::MAX, OnFull::Block)).unwrap();
    assert_eq!(rec.quarantined_segments, 1);
    assert_eq!(rec.corrupt_records, lost);
    let want: Vec<u64> = (0..60)
        .filter(|&x| x < segs[1].0 || x >= segs[2].0)
        .collect();
    assert_eq!(read_all(&mut r), want);

    let d = TempDir::new("missing");
    let segs = sealed_segments(&d.0, 60);
    fs::remove_file(&segs[2].1).unwrap();
    let (_, mut r, rec) = Spool::open(opts(&d.0, 800, u64::MAX, OnFull::Block)).unwrap();
    assert_eq!(rec.corrupt_records, segs[3].0 - segs[2].0);
    assert_eq!(read_all(&mut r).len() as u64, 60 - (segs[3].0 - segs[2].0));
}

#[test]
fn checkpoint_missing_garbage_ahead_or_behind_never_loses_a_record() {
    let cases: [(&str, Option<Vec<u8>>, bool, u64); 5] = [
        ("missing", None, false, 0),
        ("garbage", Some(b"garbage!".to_vec()), true, 0),
        (
            "bad crc",
            Some({
                let mut c = format::checkpoint(9, 20, 1).to_vec();
                c[18] ^= 1;
                c
            }),
            true,
            0,
        ),
        (
            "ahead",
            Some(format::checkpoint(9, 1_000_000, 1).to_vec()),
            true,
            0,
        ),
        (
            "behind",
            Some(format::checkpoint(9, 5, 1).to_vec()),
            false,
            5,
        ),
    ];
    for (name, ck, invalid, from) in cases {
        let d = TempDir::new("ckpt");
        let o = opts(&d.0, 800, u64::MAX, OnFull::Block);
        let (mut s, _, _) = Spool::open(o.clone()).unwrap();
        append(&mut s, 0..30);
        s.checkpoint(20).unwrap();
        drop(s);
        let p = d.0.join("checkpoint");
        match &ck {
            None => fs::remove_file(&p).unwrap(),
            Some(b) => fs::write(&p, b).unwrap(),
        }
        fs::write(d.0.join("checkpoint.tmp"), b"half-written").unwrap();
        let (_, mut r, rec) = Spool::open(o.clone()).unwrap();
        assert_eq!(rec.checkpoint_invalid, invalid, "{name}");
        let got = read_all(&mut r);
        // Segments below 20 may already be gone: everything from the first
        // remaining record is read again (duplicates), nothing after 20 is lost.
        assert!(got.contains(&20) && got.ends_with(&[29]), "{name}: {got:?}");
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{name}: {got:?}");
        assert!(got[0] <= from.max(got[0]), "{name}");
        if name == "behind" {
            assert!(got[0] <= 20);
        }
        assert!(!d.0.join("checkpoint.tmp").exists());
    }
}

#[test]
fn drop_oldest_counts_exactly_what_it_deletes() {
    let d = TempDir::new("drop");
    let (mut s, mut r, _) = Spool::open(opts(&d.0, 1000, 3500, OnFull::DropOldest)).unwrap();
    let mut dropped = 0;
    // Read (forward) the first 10 before the spool fills: those are not "dropped".
    append(&mut s, 0..10);
    let mut first = Vec::new();
    r.read(10, &mut first).unwrap();
    for b in (10..200).step_by(5) {
        let a = append(&mut s, b..b + 5);
        assert!(!a.full);
        dropped += a.dropped_records;
        assert!(s.bytes() <= 3500);
    }
    let rest = read_all(&mut r);
    assert!(dropped > 0);
    assert_eq!(
        10 + rest.len() as u64 + dropped,
        200,
        "read + dropped = appended"
    );
    assert!(rest.windows(2).all(|w| w[1] > w[0]));
    assert_eq!(*rest.last().unwrap(), 199);
}

#[test]
fn block_refuses_when_full_and_resumes_after_a_checkpoint() {
    let d = TempDir::new("block");
    let (mut s, mut r, _) = Spool::open(opts(&d.0, 1000, 3000, OnFull::Block)).unwrap();
    let mut n = 0;
    loop {
        let a = append(&mut s, n..n + 5);
        if a.full {
            break;
        }
        n += 5;
        assert!(n < 1000, "never full");
    }
    let bytes = s.bytes();
    assert!(append(&mut s, n..n + 5).full, "still full");
    assert_eq!(s.bytes(), bytes, "nothing written while full");
    assert_eq!(read_all(&mut r), (0..n).collect::<Vec<_>>());
    s.checkpoint(n).unwrap();
    assert!(!append(&mut s, n..n + 5).full);
    assert_eq!(read_all(&mut r), (n..n + 5).collect::<Vec<_>>());
}

/// The bytes of every file in `dir` (a picture of what is on stable storage).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// What is on stable storage after a checkpoint: its files as they are now;
/// sealed segments are as they are now (fsynced when sealed), but the active
/// one only as of its last fsync (the previous picture, or just its header
/// if it was started since: its header is fsynced when created).
fn photo_after_checkpoint(
    prev: &BTreeMap<String, Vec<u8>>,
    dir: &Path,
) -> BTreeMap<String, Vec<u8>> {
    let mut now = snapshot(dir);
    if let Some((name, bytes)) = now.iter_mut().rev().find(|(n, _)| n.ends_with(".seg")) {
        *bytes = match prev.get(name) {
            Some(p) => p.clone(),
            None => bytes[..SEGMENT_HEADER_LEN].to_vec(),
        };
    }
    now
}

#[test]
fn power_cut_keeps_every_record_that_was_synced() {
    // Durable state is photographed after every fsync (append + sync, and each
    // checkpoint, which fsyncs itself). A power cut keeps the last photograph
    // plus any prefix of the bytes written to the active segment since, or
    // zeros where the file grew. As the writer does, records are readable
    // (forwarded) once written, before their fsync. Every record synced before
    // the cut and not yet acknowledged by Kafka must come back, in order, and
    // the checkpoint never points past the data.
    for seed in 1..=40u64 {
        let d = TempDir::new("power");
        let mut rng = Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F));
        let o = opts(&d.0, 500 + rng.below(2000), u64::MAX, OnFull::Block);
        let (mut s, mut r, _) = Spool::open(o.clone()).unwrap();
        let mut photo = snapshot(&d.0);
        let mut synced: Vec<u64> = Vec::new(); // PUBACKed, not yet in Kafka
        let mut n = 0;
        let steps = 5 + rng.below(60);
        let mut unsynced: Vec<u64> = Vec::new(); // written, not yet PUBACKed
        for _ in 0..steps {
            let k = 1 + rng.below(15);
            let mut recs: Vec<Record> = (n..n + k).map(reading).collect();
            s.append(&mut recs).unwrap();
            s.publish();
            unsynced.extend(n..n + k);
            n += k;
            if rng.below(3) > 0 {
                s.sync().unwrap();
                synced.append(&mut unsynced);
                photo = snapshot(&d.0);
            } else if rng.below(4) == 0 {
                break; // the power goes before the fsync
            }
            if rng.below(4) == 0 {
                let mut b = Vec::new();
                r.read(rng.below(40) as usize, &mut b).unwrap();
                if let Some(last) = b.last() {
                    // Kafka acknowledged what was read, fsynced or not:
                    // checkpoint (as far as fsynced; it fsyncs itself).
                    s.checkpoint(last.offset + 1).unwrap();
                    assert!(s.acked() <= last.offset + 1, "seed {seed}");
                    let acked = s.acked();
                    synced.retain(|&x| x >= acked);
                    photo = photo_after_checkpoint(&photo, &d.0);
                }
            }
        }
        let now = snapshot(&d.0);
        drop((s, r));
        // Rebuild the disk as the power cut leaves it.
        let cut = TempDir::new("power-cut");
        for (name, bytes) in &photo {
            let mut b = bytes.clone();
            if let Some(cur) = now.get(name) {
                if cur.len() > b.len() && name.ends_with(".seg") {
                    let extra = rng.below((cur.len() - b.len()) as u64 + 1) as usize;
                    if rng.below(3) == 0 {
                        b.extend(std::iter::repeat_n(0u8, extra));
                    } else {
                        b.extend_from_slice(&cur[b.len()..b.len() + extra]);
                    }
                }
            }
            fs::write(cut.0.join(name), b).unwrap();
        }
        let (_, mut r, rec) = Spool::open(opts(&cut.0, 4000, u64::MAX, OnFull::Block)).unwrap();
        assert!(
            !rec.checkpoint_invalid,
            "seed {seed}: checkpoint past the data"
        );
        let got = read_all(&mut r);
        assert!(got.windows(2).all(|w| w[1] > w[0]), "seed {seed}: order");
        for x in &synced {
            assert!(
                got.contains(x),
                "seed {seed}: synced record {x} lost; got {got:?}"
            );
        }
    }
}

#[test]
fn checkpoint_waits_for_the_fsync_of_what_kafka_has() {
    let d = TempDir::new("ck-synced");
    let o = opts(&d.0, 1 << 20, u64::MAX, OnFull::Block);
    let (mut s, mut r, _) = Spool::open(o.clone()).unwrap();
    append(&mut s, 0..3);
    // Written and forwarded, not yet fsynced.
    let mut recs: Vec<Record> = (3..8).map(reading).collect();
    s.append(&mut recs).unwrap();
    s.publish();
    let mut b = Vec::new();
    assert_eq!(r.read(100, &mut b).unwrap(), 8, "readable before the fsync");
    s.checkpoint(8).unwrap();
    assert_eq!(s.acked(), 3, "the checkpoint stops at the fsynced end");
    s.sync().unwrap();
    s.checkpoint(8).unwrap();
    assert_eq!(s.acked(), 8);
    // With fsync = "never", what is written counts.
    let mut recs: Vec<Record> = (8..10).map(reading).collect();
    s.append(&mut recs).unwrap();
    s.progress().mark_synced(s.next_offset());
    s.checkpoint(10).unwrap();
    assert_eq!(s.acked(), 10);
    drop((s, r));
    let (_, _, rec) = Spool::open(o).unwrap();
    assert_eq!(rec.pending_records, 0);
    assert!(!rec.checkpoint_invalid);
}

#[test]
fn recovery_returns_recent_readings_for_duplicate_detection() {
    let d = TempDir::new("recent");
    let o = opts(&d.0, 1 << 20, u64::MAX, OnFull::Block);
    let (mut s, _, _) = Spool::open(o.clone()).unwrap();
    append(&mut s, 0..3);
    drop(s);
    let (_, _, rec) = Spool::open(o).unwrap();
    assert_eq!(rec.recent.len(), 3);
    assert_eq!(rec.recent[2], (b"dev-2".to_vec(), 2, 1_700_000_000_002));
}

/// The writer and syncer threads, per fsync policy: readings are confirmed in
/// arrival order (with `batch` only once fsynced: the checkpoint may then
/// cover them), and `finish` fsyncs what is left, so the checkpoint reaches
/// the end.
#[test]
fn writer_confirms_in_order_and_marks_what_is_synced_per_policy() {
    use super::writer::{SyncPolicy, Writer};
    use crate::config::FsyncMode;
    use crate::gateway::acks::AckEvent;
    use crate::gateway::acks::IdPool;
    use crate::gateway::batch::Batch;
    use crate::gateway::pool::BufPool;
    use std::time::Duration;
    for (policy, wait_ms) in [
        (FsyncMode::Batch, 0),
        (FsyncMode::Batch, 3),
        (FsyncMode::Interval, 0),
        (FsyncMode::Never, 0),
    ] {
        let d = TempDir::new("writer");
        let (s, mut r, _) = Spool::open(opts(&d.0, 4096, u64::MAX, OnFull::Block)).unwrap();
        let shared = s.progress().clone();
        let spool = std::sync::Arc::new(std::sync::Mutex::new(s));
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let w = Writer::start(
            spool.clone(),
            SyncPolicy {
                mode: policy,
                interval: Duration::from_secs(3600),
                wait: Duration::from_millis(wait_ms),
            },
            tx,
            crate::gateway::metrics::GatewayMetrics::new(),
            (BufPool::default(), IdPool::default()),
        )
        .unwrap();
        // 40 batches of 5 readings (segments of 4 KiB: several rotations),
        // every 4th batch with one more reading that has no record.
        let mut next_ack = 0u64;
        let mut n = 0u64;
        // Per ack id: the offset after its record (spool offsets start at 0).
        let mut record_end: Vec<Option<u64>> = Vec::new();
        for i in 0..40 {
            let mut b = Batch::default();
            for _ in 0..5 {
                b.push(&reading(n), 0);
                b.acks.push(next_ack);
                n += 1;
                record_end.push(Some(n));
                next_ack += 1;
            }
            if i % 4 == 0 {
                b.acks.push(next_ack);
                record_end.push(None);
                next_ack += 1;
            }
            w.tx.send(b).unwrap();
        }
        let mut confirmed = Vec::new();
        while (confirmed.len() as u64) < next_ack {
            match events.blocking_recv() {
                Some(AckEvent::Ready(ids)) => {
                    confirmed.extend(ids);
                    if policy == FsyncMode::Batch {
                        // Confirmed means fsynced (what the checkpoint may cover).
                        let last = confirmed
                            .iter()
                            .filter_map(|&a| record_end[a as usize])
                            .max();
                        assert!(
                            shared.synced.load(std::sync::atomic::Ordering::Acquire)
                                >= last.unwrap_or(0),
                            "{policy:?}: confirmed before the fsync"
                        );
                    }
                }
                other => panic!("{policy:?}: {other:?}"),
            }
        }
        assert_eq!(
            confirmed,
            (0..next_ack).collect::<Vec<_>>(),
            "{policy:?}: order"
        );
        let mut got = Vec::new();
        r.read(1000, &mut got).unwrap();
        assert_eq!(got.len() as u64, n, "{policy:?}: every record readable");
        w.finish();
        let mut s = spool.lock().unwrap();
        s.checkpoint(n).unwrap();
        assert_eq!(s.acked(), n, "{policy:?}: finish fsyncs what is left");
    }
}

/// `fsync = "batch"` with `fsync_wait_ms`: a small group waits for company
/// (nothing confirmed while it waits), a group of `FSYNC_GROUP_BYTES` is
/// fsynced and confirmed at once, in order; a reading without a record behind
/// nothing unsynced is confirmed at once.
#[test]
fn batch_fsync_waits_for_company_but_not_past_a_full_group() {
    use super::writer::{SyncPolicy, Writer, FSYNC_GROUP_BYTES};
    use crate::config::FsyncMode;
    use crate::gateway::acks::{AckEvent, IdPool};
    use crate::gateway::batch::Batch;
    use crate::gateway::pool::BufPool;
    use std::time::{Duration, Instant};
    let d = TempDir::new("fsync-wait");
    let (s, _r, _) = Spool::open(opts(&d.0, 64 << 20, u64::MAX, OnFull::Block)).unwrap();
    let shared = s.progress().clone();
    let spool = std::sync::Arc::new(std::sync::Mutex::new(s));
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let w = Writer::start(
        spool,
        SyncPolicy {
            mode: FsyncMode::Batch,
            interval: Duration::from_secs(3600),
            // Far longer than the test: only the group's size can end the wait.
            wait: Duration::from_secs(600),
        },
        tx,
        crate::gateway::metrics::GatewayMetrics::new(),
        (BufPool::default(), IdPool::default()),
    )
    .unwrap();
    let ready = |events: &mut tokio::sync::mpsc::UnboundedReceiver<AckEvent>, within: Duration| {
        let t = Instant::now();
        let mut got = Vec::new();
        while t.elapsed() < within {
            match events.try_recv() {
                Ok(AckEvent::Ready(ids)) => got.extend(ids),
                Ok(other) => panic!("{other:?}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        got
    };
    // Nothing unsynced: a reading without a record is confirmed at once.
    let mut b = Batch::default();
    b.acks.push(0);
    w.tx.send(b).unwrap();
    assert_eq!(ready(&mut events, Duration::from_millis(300)), vec![0]);
    // One small record: it waits (and so does a reading behind it).
    let mut b = Batch::default();
    b.push(&reading(0), 0);
    b.acks.extend([1, 2]);
    w.tx.send(b).unwrap();
    assert_eq!(
        ready(&mut events, Duration::from_millis(300)),
        Vec::<u64>::new()
    );
    assert_eq!(shared.synced.load(std::sync::atomic::Ordering::Acquire), 0);
    // Enough company: fsynced and confirmed without the rest of the wait.
    let mut b = Batch::default();
    let mut n = 1;
    while b.buf.len() < FSYNC_GROUP_BYTES {
        b.push(&reading(n), 0);
        b.acks.push(n + 2);
        n += 1;
    }
    w.tx.send(b).unwrap();
    let got = ready(&mut events, Duration::from_secs(5));
    assert_eq!(got, (0..n + 2).skip(1).collect::<Vec<_>>(), "in order");
    assert_eq!(shared.synced.load(std::sync::atomic::Ordering::Acquire), n);
    w.finish();
}

/// A downgrade: a segment written by a newer release (a higher format
/// version) stops the spool with the segment named; it is not quarantined,
/// and the readings in it stay where they are.
#[test]
fn a_segment_of_a_newer_format_version_stops_the_spool_and_is_kept() {
    let d = TempDir::new("newer");
    let o = opts(&d.0, 1 << 20, u64::MAX, OnFull::Block);
    let (mut s, _, _) = Spool::open(o.clone()).unwrap();
    append(&mut s, 0..3);
    let seg = list_segments(&d.0).unwrap().pop().unwrap().1;
    drop(s);
    let mut data = fs::read(&seg).unwrap();
    data[8..10].copy_from_slice(&(format::FORMAT_VERSION + 1).to_le_bytes());
    let c = crc32c::crc32c(&data[..28]);
    data[28..32].copy_from_slice(&c.to_le_bytes());
    fs::write(&seg, &data).unwrap();
    let e = Spool::open(o).unwrap_err().to_string();
    assert!(
        e.contains(&seg.display().to_string()) && e.contains("newer release"),
        "{e}"
    );
    assert_eq!(fs::read(&seg).unwrap(), data, "left as it was");
}
