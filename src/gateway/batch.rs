//! What the pipeline hands on after one wake-up: the records it made, encoded
//! back to back exactly as the spool stores them ([`format`](mod@format)), to the spool
//! writer or (spool disabled) straight to the forwarder. One buffer per
//! wake-up instead of a few allocations per reading; the forwarder produces
//! from it borrowed ([`RecordRef`]).

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
