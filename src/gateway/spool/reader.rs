//! Reads the spool in offset order for the forwarder: only what the writer has
//! published as written, from its own file handles (page cache when it keeps up).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::format::{self, Bad, RecordRef, RECORD_PREFIX_LEN, SEGMENT_HEADER_LEN};
use super::{list_segments, Progress};

#[derive(Debug)]
struct Open {
    base: u64,
    file: BufReader<File>,
    /// Offset of the record at the cursor, as far as known.
    at: u64,
}

#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    shared: Arc<Progress>,
    open: Option<Open>,
    buf: Vec<u8>,
    /// Records skipped because they failed their checksum while being read.
    pub corrupt_skipped: u64,
}

impl SpoolReader {
    pub(super) fn new(dir: PathBuf, shared: Arc<Progress>) -> Self {
        SpoolReader {
            dir,
            shared,
            open: None,
            buf: Vec::with_capacity(4096),
            corrupt_skipped: 0,
        }
    }

    /// Reads again from `offset` (records handed to a producer that was
    /// replaced); offsets already dropped stay skipped.
    pub fn rewind(&mut self, offset: u64) {
        let mut pos = self.shared.pos();
        pos.next = offset.max(pos.floor);
        self.open = None;
    }

    /// Appends up to `max` written records to `out`, in offset order.
    #[cfg(test)]
    pub fn read(&mut self, max: usize, out: &mut Vec<super::Record>) -> io::Result<usize> {
        self.read_with(max, |r| out.push(r.to_owned()))
    }

    /// Passes up to `max` written records to `f`, in offset order, each
    /// borrowed from the read buffer.
    pub fn read_with(&mut self, max: usize, mut f: impl FnMut(RecordRef<'_>)) -> io::Result<usize> {
        let written = self.shared.written.load(Ordering::Acquire);
        let shared = self.shared.clone();
        let mut pos = shared.pos();
        let mut n = 0;
        while n < max && pos.next < written {
            if pos.next < pos.floor {
                pos.next = pos.floor;
                continue;
            }
            if self.open.as_ref().is_none_or(|o| o.at != pos.next) && !self.position(pos.next)? {
                break;
            }
            match self.next_record()? {
                Some(r) if r.offset >= pos.next => {
                    pos.next = r.offset + 1;
                    f(r);
                    if let Some(o) = &mut self.open {
                        o.at = pos.next;
                    }
                    n += 1;
                }
                Some(_) => {}
                None => {
                    // This segment has nothing more: continue in the next one.
                    let after = self.open.as_ref().map(|o| o.base).unwrap_or(0);
                    match list_segments(&self.dir)?
                        .into_iter()
                        .find(|(b, _)| *b > after)
                    {
                        Some((b, _)) => {
                            pos.next = pos.next.max(b);
                            self.open = None;
                        }
                        None => break,
                    }
                }
            }
        }
        if pos.next >= written {
            // Caught up: forget read-ahead past the written end (a write undone
            // after a full disk may be rewritten there).
            if let Some(o) = &mut self.open {
                #[allow(clippy::seek_from_current)] // a real seek empties the buffer
                o.file.seek(SeekFrom::Current(0))?;
            }
        }
        Ok(n)
    }

    /// Opens the segment holding `next` (or the first one after it) and moves
    /// to the first record at or after `next`. False if no segment has it yet.
    fn position(&mut self, next: u64) -> io::Result<bool> {
        self.open = None;
        let segs = list_segments(&self.dir)?;
        let pick = segs
            .iter()
            .rev()
            .find(|(b, _)| *b <= next)
            .or_else(|| segs.iter().find(|(b, _)| *b > next));
        let Some((base, path)) = pick else {
            return Ok(false);
        };
        let mut file = match File::open(path) {
            Ok(f) => BufReader::with_capacity(256 * 1024, f),
            // Deleted meanwhile (drop_oldest): the caller moves on.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(SEGMENT_HEADER_LEN as u64))?;
        let mut o = Open {
            base: *base,
            file,
            at: *base,
        };
        // Skip records below `next` (restart inside a segment).
        while o.at < next {
            if !matches!(read_record(&mut o.file, &mut self.buf)?, Next::Record) {
                break; // end or damage: next_record() sees it again
            }
            let off = format::peek_offset(&self.buf);
            if off >= next {
                o.file.seek_relative(-(self.buf.len() as i64))?;
                o.at = off;
                break;
            }
            o.at = off + 1;
        }
        self.open = Some(o);
        Ok(true)
    }

    /// The record at the cursor, or `None` at the end of the segment (or at a
    /// damaged record, which is counted and ends the segment).
    fn next_record(&mut self) -> io::Result<Option<RecordRef<'_>>> {
        let Some(o) = &mut self.open else {
            return Ok(None);
        };
        let why = match read_record(&mut o.file, &mut self.buf)? {
            Next::End => return Ok(None),
            Next::Damaged => "record length out of range",
            Next::Record => match format::decode_ref(&self.buf) {
                Ok((r, _)) => return Ok(Some(r)),
                Err(Bad::Corrupt(why)) => why,
                Err(Bad::Incomplete) => "incomplete record",
            },
        };
        tracing::error!(
            segment_base = o.base,
            offset = o.at,
            why,
            "spool record damaged while forwarding; skipping the rest of the segment"
        );
        self.corrupt_skipped += 1;
        Ok(None)
    }
}

enum Next {
    Record,
    End,
    Damaged,
}

/// Reads one whole record (prefix and body) into `buf`.
fn read_record(f: &mut BufReader<File>, buf: &mut Vec<u8>) -> io::Result<Next> {
    buf.resize(RECORD_PREFIX_LEN, 0);
    if let Err(e) = f.read_exact(buf) {
        return if e.kind() == io::ErrorKind::UnexpectedEof {
            Ok(Next::End)
        } else {
            Err(e)
        };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(format::MIN_BODY_LEN..=format::MAX_BODY_LEN).contains(&len) {
        return Ok(Next::Damaged);
    }
    buf.resize(RECORD_PREFIX_LEN + len, 0);
    match f.read_exact(&mut buf[RECORD_PREFIX_LEN..]) {
        Ok(()) => Ok(Next::Record),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Next::End),
        Err(e) => Err(e),
    }
}
