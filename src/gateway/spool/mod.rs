//! The durable spool: an append-only log of Kafka records on local disk, between
//! intake and Kafka. A reading is acknowledged to MQTT once its record is here
//! and fsynced; the forwarder reads the log in order and produces to Kafka,
//! from the moment a record is written (the fsync runs meanwhile, so it is not
//! in a reading's way to Kafka).
//!
//! Layout of `dir`:
//! - `<20-digit base offset>.seg`: a 32-byte header ([`format::segment_header`])
//!   then records (`len u32 | crc32c u32 | body`, see [`mod@format`]). Offsets
//!   increase by one per record; the file name is the first record's offset.
//!   Only the last segment is appended to; it is sealed (fsynced) when it passes
//!   `segment_bytes`, and a new one is started.
//! - `checkpoint`: every offset below it is acknowledged by Kafka. Two
//!   checksummed slots with a generation, overwritten alternately in place and
//!   fsynced (a torn write spoils one slot; the other still holds an older,
//!   lagging value; and a full disk cannot stop it). It may lag (records sent
//!   again after a crash: duplicates) but never leads: it is written only for
//!   records Kafka acknowledged, never past what is fsynced (Kafka may have a
//!   record before the spool's fsync of it ends), and segments are deleted
//!   only once a durable checkpoint covers them.
//! - `quarantine/`: damaged segments moved aside (or copied before repair).
//!
//! Recovery on open never refuses to start: every segment is scanned; a bad
//! record is skipped by finding the next valid one (the segment is rewritten,
//! the original kept in `quarantine/`); a damaged tail (torn write, zeros,
//! garbage) is truncated; a segment with a bad header is quarantined; a
//! checkpoint that is missing, corrupt or ahead of the data means "nothing
//! acknowledged" (duplicates, never loss). Each of these is counted in
//! [`Recovery`] and logged by the caller.
//!
//! Over 500 lines: open, recovery, append and checkpoint keep one invariant (the recovery contract
//! above) and stay together; the tests are in `spool/tests.rs`.

pub mod format;
pub mod reader;
pub mod writer;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use self::format::{Bad, SEGMENT_HEADER_LEN};
pub use self::format::{Header, Record, RecordRef};
pub use self::reader::SpoolReader;

/// What to do when `max_bytes` (or the disk) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Stop acknowledging new readings until Kafka frees space.
    Block,
    /// Delete the oldest segment not yet in Kafka (counted).
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub on_full: OnFull,
}

/// What recovery found on open.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    /// Records not yet acknowledged by Kafka (to be forwarded).
    pub pending_records: u64,
    /// Bytes cut from damaged segment tails.
    pub truncated_bytes: u64,
    /// Records lost to damage (checksum failures, missing segments).
    pub corrupt_records: u64,
    pub quarantined_segments: u64,
    /// The checkpoint was unreadable or ahead of the data.
    pub checkpoint_invalid: bool,
    /// (key, seq, ts) of the newest records, for duplicate detection.
    pub recent: Vec<(Vec<u8>, u64, i64)>,
}

/// How many recent (device, seq, ts) recovery hands back.
pub const RECENT_KEEP: usize = 65_536;

/// The result of an append.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Nothing was written: full, and the policy (or the disk) gives no room.
    pub full: bool,
    /// Records deleted by `drop_oldest` to make room (never forwarded).
    pub dropped_records: u64,
    pub dropped_bytes: u64,
}

/// How far the writer got (written, fsynced) and where the reader is: shared
/// by the writer, the syncer and the reader.
#[derive(Debug)]
pub struct Progress {
    /// Every offset below this is written (to the page cache; the fsync may
    /// still be running): the reader may forward it.
    pub written: AtomicU64,
    /// Every offset below this is fsynced (or, with `fsync = "never"`, taken
    /// as written back): the checkpoint never passes it.
    synced: AtomicU64,
    pos: Mutex<ReadPos>,
    /// Woken when `written` advances.
    pub notify: tokio::sync::Notify,
}

#[derive(Debug)]
struct ReadPos {
    /// The reader's next offset.
    next: u64,
    /// Offsets below were deleted by `drop_oldest`: the reader skips them.
    floor: u64,
}

impl Progress {
    /// Every offset below `through` is fsynced.
    pub fn mark_synced(&self, through: u64) {
        self.synced.fetch_max(through, Ordering::AcqRel);
    }

    fn pos(&self) -> MutexGuard<'_, ReadPos> {
        // A panic elsewhere cannot leave ReadPos half-updated (two plain fields).
        crate::sync::lock(&self.pos)
    }
}

#[derive(Debug)]
struct Segment {
    base: u64,
    /// Offset after its last record.
    end: u64,
    bytes: u64,
    path: PathBuf,
}

/// The writer's side of the spool.
#[derive(Debug)]
pub struct Spool {
    opts: SpoolOptions,
    /// In offset order; the last one is the active segment.
    segments: VecDeque<Segment>,
    active: File,
    next: u64,
    acked: u64,
    checkpoint: Checkpoint,
    total_bytes: u64,
    buf: Vec<u8>,
    shared: Arc<Progress>,
    /// Held (locked) while the spool is open.
    _lock: File,
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

/// The segments in `dir`, sorted by base offset.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".seg") {
            if stem.len() == 20 {
                if let Ok(base) = stem.parse::<u64>() {
                    v.push((base, e.path()));
                }
            }
        }
    }
    v.sort();
    Ok(v)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

use crate::clock::now_ms;

/// Disk full (or over quota): a "full" event, not a fatal error.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) || e.kind() == io::ErrorKind::StorageFull
}

impl Spool {
    /// Opens (recovering) or creates the spool in `opts.dir`. Fails only when the
    /// directory cannot be used at all; damage inside it is repaired and counted.
    pub fn open(opts: SpoolOptions) -> io::Result<(Spool, SpoolReader, Recovery)> {
        fs::create_dir_all(&opts.dir)?;
        let dir = opts.dir.clone();
        // One writer per directory; the lock goes with the process.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        if lock.try_lock().is_err() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "in use by another gateway; give each gateway its own spool.dir",
            ));
        }
        let _ = fs::remove_file(dir.join("checkpoint.tmp"));
        let mut rec = Recovery::default();
        let mut generation = 0;
        let ck_file = match fs::read(dir.join("checkpoint")) {
            Ok(b) => match format::parse_checkpoint_file(&b) {
                Some((g, c)) => {
                    generation = g;
                    Some(c)
                }
                None => {
                    rec.checkpoint_invalid = true;
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let files = list_segments(&dir)?;
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut recent: VecDeque<(Vec<u8>, u64, i64)> = VecDeque::new();
        // Offset ranges no record holds (skipped damage, missing segments).
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        for (i, (base, path)) in files.iter().enumerate() {
            let limit = files.get(i + 1).map(|(b, _)| *b).unwrap_or(u64::MAX);
            let last = i + 1 == files.len();
            if let Some(seg) = recover_segment(
                &dir,
                *base,
                path,
                limit,
                last,
                &mut rec,
                &mut recent,
                &mut gaps,
            )? {
                if let Some(prev) = segments.back() {
                    gaps.push((prev.end, seg.base));
                }
                segments.push_back(seg);
            }
        }
        let end = segments.back().map(|s| s.end);
        let first = segments.front().map(|s| s.base);
        let ck = match (ck_file, end) {
            (Some(c), Some(e)) if c > e => {
                rec.checkpoint_invalid = true;
                first.unwrap_or(0)
            }
            (Some(c), _) => c,
            (None, _) => first.unwrap_or(0),
        };
        // Offsets between the first unacknowledged one and the end that no
        // segment holds were lost to damage.
        if let (Some(f), Some(e)) = (first, end) {
            let from = f.max(ck);
            let lost: u64 = gaps
                .iter()
                .map(|&(a, b)| b.min(e).saturating_sub(a.max(from)))
                .sum();
            rec.corrupt_records += lost;
            rec.pending_records = e.saturating_sub(from) - lost.min(e.saturating_sub(from));
        }
        // Drop what the checkpoint covers, and empty segments.
        let mut changed = false;
        segments.retain(|s| {
            if s.end <= ck || s.end == s.base {
                let _ = fs::remove_file(&s.path);
                changed = true;
                false
            } else {
                true
            }
        });
        let next = end.unwrap_or(0).max(ck);
        let start = segments.front().map(|s| s.base.max(ck)).unwrap_or(next);
        // Always append to a fresh segment: recovered ones stay as they are.
        let (active, seg) = create_segment(&dir, next)?;
        segments.push_back(seg);
        let mut checkpoint = Checkpoint::open(&dir, generation)?;
        if rec.checkpoint_invalid || ck_file.is_none() {
            checkpoint.write(ck)?;
        }
        if changed {
            sync_dir(&dir)?;
        }
        rec.recent = recent.into_iter().collect();
        let shared = Arc::new(Progress {
            written: AtomicU64::new(next),
            synced: AtomicU64::new(next),
            pos: Mutex::new(ReadPos {
                next: start,
                floor: start,
            }),
            notify: tokio::sync::Notify::new(),
        });
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let spool = Spool {
            opts,
            segments,
            active,
            next,
            acked: ck,
            checkpoint,
            total_bytes,
            buf: Vec::with_capacity(1 << 20),
            shared: shared.clone(),
            _lock: lock,
        };
        Ok((spool, SpoolReader::new(dir, shared), rec))
    }

    /// Writes `records` (assigning their offsets) without fsync. On `full`
    /// nothing was written and the offsets are unset.
    pub fn append(&mut self, records: &mut [Record]) -> io::Result<Appended> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for r in records.iter() {
            format::encode(r, 0, &mut buf);
        }
        let out = self.append_encoded(&mut buf, records.len());
        self.buf = buf;
        let out = out?;
        if !out.full {
            let first = self.next - records.len() as u64;
            for (i, r) in records.iter_mut().enumerate() {
                r.offset = first + i as u64;
            }
        }
        Ok(out)
    }

    /// Writes `count` records encoded back to back in `encoded` (by
    /// [`format::encode`], any offsets: they are given theirs here) without
    /// fsync. On `full` nothing was written.
    pub fn append_encoded(&mut self, encoded: &mut [u8], count: usize) -> io::Result<Appended> {
        let mut out = Appended::default();
        if count == 0 {
            return Ok(out);
        }
        let mut at = 0;
        for i in 0..count as u64 {
            at += format::restamp(&mut encoded[at..], self.next + i).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record {i} of a group is not encoded ({e:?})"),
                )
            })?;
        }
        let encoded = &encoded[..at];
        let len = at as u64;
        loop {
            if self.active_records() > 0 && self.active_bytes() + len > self.opts.segment_bytes {
                match self.rotate() {
                    Ok(()) => {}
                    Err(e) if is_no_space(&e) => {
                        if !self.make_room(&mut out)? {
                            out.full = true;
                            return Ok(out);
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.total_bytes + len > self.opts.max_bytes && !self.make_room(&mut out)? {
                out.full = true;
                return Ok(out);
            }
            if self.total_bytes + len > self.opts.max_bytes {
                continue;
            }
            let before = self.active_bytes();
            match self.active.write_all(encoded) {
                Ok(()) => break,
                Err(e) if is_no_space(&e) => {
                    // Undo the partial write, then apply the policy.
                    self.active.set_len(before)?;
                    if !self.make_room(&mut out)? {
                        out.full = true;
                        return Ok(out);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.next += count as u64;
        self.total_bytes += len;
        if let Some(a) = self.segments.back_mut() {
            a.end = self.next;
            a.bytes += len;
        }
        Ok(out)
    }

    /// fsyncs what was appended, as the writer's syncer thread does through
    /// its own handle ([`Spool::active_file`]).
    #[cfg(test)]
    pub fn sync(&mut self) -> io::Result<()> {
        self.active.sync_data()?;
        self.shared.mark_synced(self.next);
        Ok(())
    }

    /// The first offset of the segment appended to.
    pub fn active_base(&self) -> u64 {
        self.segments.back().map(|s| s.base).unwrap_or(self.next)
    }

    /// A handle of the segment appended to, for an fsync on another thread.
    pub fn active_file(&self) -> io::Result<File> {
        self.active.try_clone()
    }

    /// Lets the reader forward everything appended so far (fsynced or not).
    pub fn publish(&self) {
        self.shared.written.store(self.next, Ordering::Release);
        self.shared.notify.notify_one();
    }

    /// Records every offset below `acked` as in Kafka, as far as it is
    /// fsynced, then deletes the segments that holds entirely (never the
    /// active one). A checkpoint past the fsynced end could, after a power
    /// cut, point past the data: recovery would then send everything again.
    pub fn checkpoint(&mut self, acked: u64) -> io::Result<()> {
        let acked = acked.min(self.shared.synced.load(Ordering::Acquire));
        if acked <= self.acked {
            return Ok(());
        }
        self.checkpoint.write(acked)?;
        self.acked = acked;
        let mut removed = false;
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end <= acked) {
            if let Some(s) = self.segments.pop_front() {
                fs::remove_file(&s.path)?;
                self.total_bytes -= s.bytes;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.opts.dir)?;
        }
        Ok(())
    }

    /// With `drop_oldest`: deletes the oldest sealed segment. Returns false when
    /// there is nothing to drop (or the policy is `block`).
    fn make_room(&mut self, out: &mut Appended) -> io::Result<bool> {
        if self.opts.on_full == OnFull::Block || self.segments.len() < 2 {
            return Ok(false);
        }
        let Some(s) = self.segments.pop_front() else {
            return Ok(false);
        };
        {
            let mut pos = self.shared.pos();
            // Records already handed to Kafka are not dropped: they arrive.
            let from = s.base.max(pos.next).max(self.acked);
            out.dropped_records += s.end.saturating_sub(from);
            pos.floor = pos.floor.max(s.end);
            pos.next = pos.next.max(s.end);
        }
        fs::remove_file(&s.path)?;
        sync_dir(&self.opts.dir)?;
        out.dropped_bytes += s.bytes;
        self.total_bytes -= s.bytes;
        Ok(true)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.active.sync_data()?;
        self.shared.mark_synced(self.next);
        let (file, seg) = create_segment(&self.opts.dir, self.next)?;
        self.total_bytes += seg.bytes;
        self.active = file;
        self.segments.push_back(seg);
        Ok(())
    }

    fn active_records(&self) -> u64 {
        self.segments.back().map(|s| s.end - s.base).unwrap_or(0)
    }

    fn active_bytes(&self) -> u64 {
        self.segments.back().map(|s| s.bytes).unwrap_or(0)
    }

    /// Bytes of all segment files.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The next offset to be assigned.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Every offset below this is in Kafka (as of the last checkpoint).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.shared
    }
}

fn create_segment(dir: &Path, base: u64) -> io::Result<(File, Segment)> {
    let path = dir.join(segment_name(base));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let written = f
        .write_all(&format::segment_header(base, now_ms()))
        .and_then(|()| f.sync_data())
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    // Appends go to the end, also after a truncation that undid a partial write.
    let f = OpenOptions::new().append(true).open(&path)?;
    Ok((
        f,
        Segment {
            base,
            end: base,
            bytes: SEGMENT_HEADER_LEN as u64,
            path,
        },
    ))
}

/// The checkpoint file, kept open; both slots are allocated when it is created.
#[derive(Debug)]
struct Checkpoint {
    file: File,
    generation: u64,
}

impl Checkpoint {
    fn open(dir: &Path, generation: u64) -> io::Result<Checkpoint> {
        let path = dir.join("checkpoint");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        if file.metadata()?.len() < 2 * format::CHECKPOINT_LEN as u64 {
            // New (or short): lay out both slots before relying on it.
            let mut both = fs::read(&path).unwrap_or_default();
            both.resize(2 * format::CHECKPOINT_LEN, 0);
            std::os::unix::fs::FileExt::write_all_at(&file, &both, 0)?;
            file.sync_all()?;
            sync_dir(dir)?;
        }
        Ok(Checkpoint { file, generation })
    }

    fn write(&mut self, acked: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let g = self.generation + 1;
        let slot = (g % 2) * format::CHECKPOINT_LEN as u64;
        self.file
            .write_all_at(&format::checkpoint(g, acked, now_ms()), slot)?;
        self.file.sync_data()?;
        self.generation = g;
        Ok(())
    }
}

/// Moves (or, with `copy`, copies) a damaged file into `quarantine/`. Best
/// effort: on a full disk a moved file is deleted instead, a copy skipped.
fn quarantine(dir: &Path, path: &Path, copy: bool) -> io::Result<()> {
    if let Err(e) = try_quarantine(dir, path, copy) {
        tracing::error!(file = %path.display(), error = %e, "could not keep a damaged spool file in quarantine/");
        if !copy {
            fs::remove_file(path)?;
        }
    }
    Ok(())
}

fn try_quarantine(dir: &Path, path: &Path, copy: bool) -> io::Result<()> {
    let q = dir.join("quarantine");
    fs::create_dir_all(&q)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to = q.join(format!("{name}.{}", now_ms()));
    if copy {
        fs::copy(path, &to)?;
    } else {
        fs::rename(path, &to)?;
    }
    sync_dir(&q)
}

/// Scans one segment, repairing it in place. `limit` is the next segment's base.
#[allow(clippy::too_many_arguments)]
fn recover_segment(
    dir: &Path,
    base: u64,
    path: &Path,
    limit: u64,
    last: bool,
    rec: &mut Recovery,
    recent: &mut VecDeque<(Vec<u8>, u64, i64)>,
    gaps: &mut Vec<(u64, u64)>,
) -> io::Result<Option<Segment>> {
    let data = fs::read(path)?;
    if let Some(v) = format::segment_version(&data).filter(|&v| v > format::FORMAT_VERSION) {
        // Quarantining it would hide readings a newer release spooled (a
        // downgrade): stop, and say so.
        return Err(io::Error::other(format!(
            "segment {} has spool format version {v}, newer than this release reads ({}): it was written by a newer release; upgrade again, or move the segment out of the spool directory",
            path.display(),
            format::FORMAT_VERSION
        )));
    }
    if format::parse_segment_header(&data) != Some(base) {
        if last && data.len() < SEGMENT_HEADER_LEN {
            // Created but never completed (crash during rotation).
            rec.truncated_bytes += data.len() as u64;
            fs::remove_file(path)?;
        } else {
            tracing::error!(segment = %path.display(), "spool segment has a bad header; quarantined");
            rec.quarantined_segments += 1;
            quarantine(dir, path, false)?;
        }
        return Ok(None);
    }
    let mut at = SEGMENT_HEADER_LEN;
    let mut expected = base;
    // Byte ranges of good records, when the file must be rewritten.
    let mut keep: Vec<(usize, usize)> = Vec::new();
    let mut skipped = false;
    // The first damage: (byte, offset expected there), for the fallback below.
    let mut first_bad: Option<(usize, u64)> = None;
    let mut cut = None;
    while at < data.len() {
        match format::decode_ref(&data[at..]) {
            Ok((r, n)) if r.offset >= expected && r.offset < limit => {
                if let Some(seq) = r.seq {
                    recent.push_back((
                        r.key.unwrap_or_default().to_vec(),
                        seq,
                        r.ts_ms.unwrap_or(0),
                    ));
                    if recent.len() > RECENT_KEEP {
                        recent.pop_front();
                    }
                }
                keep.push((at, at + n));
                if r.offset > expected {
                    gaps.push((expected, r.offset));
                }
                expected = r.offset + 1;
                at += n;
            }
            other => {
                let why = match other {
                    Err(Bad::Corrupt(w)) => w,
                    Err(Bad::Incomplete) => "incomplete record",
                    Ok(_) => "offset out of order",
                };
                first_bad.get_or_insert((at, expected));
                match resync(&data, at + 1, expected, limit) {
                    Some(p) => {
                        tracing::error!(segment = %path.display(), byte = at, why, "spool record damaged; skipped to the next valid record");
                        skipped = true;
                        at = p;
                    }
                    None => {
                        cut = Some((at, why));
                        break;
                    }
                }
            }
        }
    }
    let mut len = data.len() as u64;
    if skipped {
        // Keep the original for forensics, then rewrite without the damage.
        quarantine(dir, path, true)?;
        rec.quarantined_segments += 1;
        match rewrite(dir, path, &data, &keep) {
            Ok(n) => len = n,
            Err(e) => {
                // No room to rewrite: keep what precedes the first damage.
                let (at, lost_from) = first_bad.unwrap_or((data.len(), expected));
                tracing::error!(segment = %path.display(), error = %e, "could not rewrite a damaged spool segment; truncated at the damage");
                gaps.push((lost_from, expected));
                rec.truncated_bytes += (data.len() - at) as u64;
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(at as u64)?;
                f.sync_data()?;
                len = at as u64;
                expected = lost_from;
            }
        }
    } else if let Some((at, why)) = cut {
        let cut_bytes = data.len() - at;
        if last {
            tracing::warn!(segment = %path.display(), byte = at, bytes = cut_bytes, why, "spool tail was incomplete (torn write); truncated");
        } else {
            tracing::error!(segment = %path.display(), byte = at, bytes = cut_bytes, why, "spool segment damaged at the end; truncated");
        }
        rec.truncated_bytes += cut_bytes as u64;
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(at as u64)?;
        f.sync_data()?;
        len = at as u64;
    }
    Ok(Some(Segment {
        base,
        end: expected,
        bytes: len,
        path: path.to_path_buf(),
    }))
}

/// Writes `path` anew with its header and the `keep` byte ranges of `data`.
fn rewrite(dir: &Path, path: &Path, data: &[u8], keep: &[(usize, usize)]) -> io::Result<u64> {
    let tmp = path.with_extension("seg.tmp");
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&data[..SEGMENT_HEADER_LEN])?;
        let mut len = SEGMENT_HEADER_LEN as u64;
        for &(a, b) in keep {
            f.write_all(&data[a..b])?;
            len += (b - a) as u64;
        }
        f.sync_data()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)?;
        Ok(len)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The position of the next valid record at or after `from` whose offset is in
/// `[expected, limit)`.
fn resync(data: &[u8], from: usize, expected: u64, limit: u64) -> Option<usize> {
    (from..data.len()).find(|&p| {
        let b = &data[p..];
        format::plausible_start(b, expected, limit) && format::decode_ref(b).is_ok()
    })
}

#[cfg(test)]
mod tests;
