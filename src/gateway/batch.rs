//! What the pipeline hands on after one wake-up: the records it made, encoded
//! back to back exactly as the spool stores them ([`format`]), to the spool
//! writer or (spool disabled) straight to the forwarder. One buffer per
//! wake-up instead of a few allocations per reading; the forwarder produces
//! from it borrowed ([`RecordRef`]).

use std::sync::{Arc, Mutex};

use super::acks::AckId;
use super::spool::format::{self, RecordMeta};
use super::spool::{Record, RecordRef};

#[derive(Debug, Default)]
pub struct Batch {
    /// With the spool: every reading of the wake-up in arrival order, all
    /// confirmed once the group is durable (a duplicate or a dropped reading
    /// has an ack but no record). Without it the records' offsets are the ack
    /// ids, and this stays empty.
    pub acks: Vec<AckId>,
    /// The records, encoded; each one's offset is its id for the forwarder
    /// (the spool writer gives them spool offsets instead).
    pub buf: Vec<u8>,
    /// Records in `buf`.
    pub records: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.records == 0
    }

    /// Appends `r` with `id` as its offset.
    pub fn push(&mut self, r: &Record, id: u64) {
        format::encode(r, id, &mut self.buf);
        self.records += 1;
    }

    /// Appends a record made of these parts (see [`format::encode_parts`]).
    pub fn push_parts<'h>(
        &mut self,
        id: u64,
        meta: RecordMeta,
        key: Option<&[u8]>,
        headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
        value: &[u8],
    ) {
        format::encode_parts(&mut self.buf, id, meta, key, headers, value);
        self.records += 1;
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = RecordRef<'_>> {
        let mut rest = &self.buf[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            match format::decode_ref(rest) {
                Ok((r, n)) => {
                    rest = &rest[n..];
                    Some(r)
                }
                // Encoded in this process just before: cannot happen.
                Err(e) => {
                    tracing::error!(
                        ?e,
                        "a pipeline batch does not decode (a bug); its rest is skipped"
                    );
                    rest = &[];
                    None
                }
            }
        })
    }
}

/// Emptied buffers on their way back to where they are filled (batch buffers
/// to the pipeline, [`Received`](super::Received) to the MQTT source), so that
/// the next one is written into memory that has its size already instead of
/// being grown anew, and is freed on the thread that allocated it.
#[derive(Debug)]
pub struct Pool<T>(Arc<(Mutex<Vec<T>>, usize)>);

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool(self.0.clone())
    }
}

impl<T> Default for Pool<T> {
    /// Keeps two: what a drain needs, bounded.
    fn default() -> Self {
        Pool::new(2)
    }
}

/// The largest batch buffer kept.
const POOL_MAX_BYTES: usize = 4 << 20;

impl<T> Pool<T> {
    /// A pool that keeps at most `keep`.
    pub fn new(keep: usize) -> Self {
        Pool(Arc::new((Mutex::new(Vec::new()), keep)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<T>> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back something emptied (dropped if the pool is full).
    pub fn give(&self, t: T) {
        let mut p = self.lock();
        if p.len() < self.0 .1 {
            p.push(t);
        }
    }

    pub fn take(&self) -> Option<T> {
        self.lock().pop()
    }
}

impl Pool<Vec<u8>> {
    /// Gives back a batch buffer that is no longer needed.
    pub fn give_buf(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_MAX_BYTES {
            return;
        }
        buf.clear();
        self.give(buf);
    }
}

impl Pool<Vec<AckId>> {
    /// Gives back a list of settled ids once read.
    pub fn give_ids(&self, mut ids: Vec<AckId>) {
        ids.clear();
        self.give(ids);
    }
}

/// Batch buffers.
pub type BufPool = Pool<Vec<u8>>;
/// Lists of settled ids (from the forwarder or the spool writer, back from
/// the pipeline).
pub type IdPool = Pool<Vec<AckId>>;
