//! Byte layout of segments, records and the checkpoint (pure, no I/O).
//!
//! All integers are little-endian. A record is
//! `len u32 | crc u32 | body[len]` with `crc = CRC32C(len as 4 bytes ++ body)`,
//! so a torn length can never validate. The body starts with the record's
//! spool offset, which makes a zero-filled or recycled region fail even when a
//! CRC happens to match.
//!
//! Over 500 lines with its unit tests; the code is about 320.

use std::borrow::Cow;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"IOTSPOOL";
/// First bytes of the checkpoint file.
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"IOTSPCK1";
pub const FORMAT_VERSION: u16 = 1;
/// magic 8 | version u16 | flags u16 | base offset u64 | created ms i64 | crc u32
pub const SEGMENT_HEADER_LEN: usize = 32;
/// One checkpoint slot: magic 8 | generation u64 | acked-through u64 |
/// written ms i64 | crc u32. The file holds two slots, written alternately
/// in place (no allocation on a full disk; a torn write spoils one slot only).
pub const CHECKPOINT_LEN: usize = 36;
/// `len` + `crc` in front of every body.
pub const RECORD_PREFIX_LEN: usize = 8;
/// Largest body accepted when reading back: anything larger is damage.
pub const MAX_BODY_LEN: usize = 16 << 20;

const FLAG_DLQ: u8 = 1;
const FLAG_SEQ: u8 = 2;
const FLAG_KEY: u8 = 4;
const FLAG_TS: u8 = 8;

/// One spooled Kafka record, exactly as it will be produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Spool offset (set by the spool when appended).
    pub offset: u64,
    /// When the gateway received the payload (epoch ms).
    pub received_ms: i64,
    /// Kafka record timestamp (the reading's `ts`), if any.
    pub ts_ms: Option<i64>,
    /// A dead-letter record (goes to the DLQ topic).
    pub dlq: bool,
    /// The device's `seq`, kept for duplicate detection after a restart.
    pub seq: Option<u64>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub value: Vec<u8>,
}

/// A Kafka header. Names (and the schema version) are mostly our constants:
/// borrowed, they cost no allocation per record.
pub type Header = (Cow<'static, str>, Cow<'static, [u8]>);

/// The header names the gateway writes (see [`Header`]).
const HEADER_NAMES: [&str; 9] = [
    "schema",
    "source",
    "received_at",
    "reason",
    "detail",
    "original_size",
    "clock",
    "ts_replaced",
    "device_ts",
];

fn header_name(k: &[u8]) -> Cow<'static, str> {
    match HEADER_NAMES.iter().find(|n| n.as_bytes() == k) {
        Some(n) => Cow::Borrowed(n),
        None => Cow::Owned(String::from_utf8_lossy(k).into_owned()),
    }
}

/// Why bytes could not be read as a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Fewer bytes than the record needs (a torn tail, or not written yet).
    Incomplete,
    /// Length out of range, checksum mismatch or malformed body.
    Corrupt(&'static str),
}

fn crc(len: u32, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), body)
}

/// What a record carries besides its key, headers and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    pub received_ms: i64,
    pub ts_ms: Option<i64>,
    pub dlq: bool,
    pub seq: Option<u64>,
}

/// Appends `r` with `offset` to `out`.
pub fn encode(r: &Record, offset: u64, out: &mut Vec<u8>) {
    let meta = RecordMeta {
        received_ms: r.received_ms,
        ts_ms: r.ts_ms,
        dlq: r.dlq,
        seq: r.seq,
    };
    let headers = r.headers.iter().map(|(k, v)| (k.as_ref(), v.as_ref()));
    encode_parts(out, offset, meta, r.key.as_deref(), headers, &r.value);
}

/// Appends a record made of these parts to `out`: what intake uses, so that a
/// reading goes from its payload to these bytes without a [`Record`] between.
pub fn encode_parts<'h>(
    out: &mut Vec<u8>,
    offset: u64,
    m: RecordMeta,
    key: Option<&[u8]>,
    headers: impl ExactSizeIterator<Item = (&'h str, &'h [u8])>,
    value: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_PREFIX_LEN]);
    let mut flags = 0;
    if m.dlq {
        flags |= FLAG_DLQ;
    }
    if m.seq.is_some() {
        flags |= FLAG_SEQ;
    }
    if key.is_some() {
        flags |= FLAG_KEY;
    }
    if m.ts_ms.is_some() {
        flags |= FLAG_TS;
    }
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&m.received_ms.to_le_bytes());
    out.extend_from_slice(&m.ts_ms.unwrap_or(0).to_le_bytes());
    out.push(flags);
    out.extend_from_slice(&m.seq.unwrap_or(0).to_le_bytes());
    put_bytes16(out, key.unwrap_or_default());
    let count = headers.len().min(u16::MAX as usize);
    out.extend_from_slice(&(count as u16).to_le_bytes());
    for (k, v) in headers.take(count) {
        put_bytes16(out, k.as_bytes());
        put_bytes32(out, v);
    }
    put_bytes32(out, value);
    seal(&mut out[start..]);
}

/// Writes the length and checksum of the record that is all of `rec`.
fn seal(rec: &mut [u8]) {
    let len = (rec.len() - RECORD_PREFIX_LEN) as u32;
    let c = crc(len, &rec[RECORD_PREFIX_LEN..]);
    rec[..4].copy_from_slice(&len.to_le_bytes());
    rec[4..8].copy_from_slice(&c.to_le_bytes());
}

/// Gives the encoded record at the start of `buf` the offset `offset` (and
/// its new checksum); returns its length. The spool writer numbers records
/// that intake encoded this way.
pub fn restamp(buf: &mut [u8], offset: u64) -> Result<usize, Bad> {
    let total = record_len(buf)?;
    buf[RECORD_PREFIX_LEN..RECORD_PREFIX_LEN + 8].copy_from_slice(&offset.to_le_bytes());
    seal(&mut buf[..total]);
    Ok(total)
}

// Keys and header names are short by construction (device ids, fixed names);
// longer ones are cut rather than corrupting the record.
fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Reads the prefix at the start of `buf`: `Ok(total record length)` when
/// the length is plausible and the bytes are all there.
pub fn record_len(buf: &[u8]) -> Result<usize, Bad> {
    if buf.len() < RECORD_PREFIX_LEN {
        return Err(Bad::Incomplete);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(MIN_BODY_LEN..=MAX_BODY_LEN).contains(&len) {
        return Err(Bad::Corrupt("record length out of range"));
    }
    if buf.len() < RECORD_PREFIX_LEN + len {
        return Err(Bad::Incomplete);
    }
    Ok(RECORD_PREFIX_LEN + len)
}

/// offset, received, ts, flags, seq, key len, header count, value len.
pub const MIN_BODY_LEN: usize = 8 + 8 + 8 + 1 + 8 + 2 + 2 + 4;

/// The offset stored in a record whose prefix was accepted by [`record_len`].
pub fn peek_offset(buf: &[u8]) -> u64 {
    let mut o = [0u8; 8];
    o.copy_from_slice(&buf[RECORD_PREFIX_LEN..RECORD_PREFIX_LEN + 8]);
    u64::from_le_bytes(o)
}

/// Latest receive time a record can plausibly hold (2^45 ms: the year 3084).
const MAX_PLAUSIBLE_MS: u64 = 1 << 45;

/// A cheap test, without the checksum, that `buf` may start a record whose
/// offset is in `[expected, limit)`: what resync asks at every byte of a
/// damaged region before paying for a CRC over up to 16 MiB. Random bytes pass
/// about once in 10^9 positions (length in range, only known flags, a receive
/// time between 1970 and 3084, zero fields where the flags say absent), so
/// resync over any amount of garbage stays linear. Every record the encoder
/// writes with a receive time in that range passes.
pub fn plausible_start(buf: &[u8], expected: u64, limit: u64) -> bool {
    if record_len(buf).is_err() {
        return false;
    }
    let b = &buf[RECORD_PREFIX_LEN..];
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let (offset, received, ts, flags, seq) = (u64_at(0), u64_at(8), u64_at(16), b[24], u64_at(25));
    let key_len = u16::from_le_bytes([b[33], b[34]]);
    offset >= expected
        && offset < limit
        && received < MAX_PLAUSIBLE_MS
        && flags & !(FLAG_DLQ | FLAG_SEQ | FLAG_KEY | FLAG_TS) == 0
        && (flags & FLAG_TS != 0 || ts == 0)
        && (flags & FLAG_SEQ != 0 || seq == 0)
        && (flags & FLAG_KEY != 0 || key_len == 0)
}

/// A record as it lies in a read buffer (or a [`Record`] seen through
/// [`Record::view`]): what the forwarder produces from, with no copies.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub offset: u64,
    pub received_ms: i64,
    pub ts_ms: Option<i64>,
    pub dlq: bool,
    pub seq: Option<u64>,
    pub key: Option<&'a [u8]>,
    headers: Headers<'a>,
    pub value: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
enum Headers<'a> {
    /// `count` headers as encoded, already checked by [`decode_ref`].
    Encoded {
        bytes: &'a [u8],
        count: u16,
    },
    List(&'a [Header]),
}

impl<'a> RecordRef<'a> {
    /// Its headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let (mut list, mut c, mut left) = match self.headers {
            Headers::Encoded { bytes, count } => (None, Cursor { b: bytes, at: 0 }, count),
            Headers::List(l) => (Some(l.iter()), Cursor { b: &[], at: 0 }, 0),
        };
        std::iter::from_fn(move || match &mut list {
            Some(l) => l.next().map(|(k, v)| (k.as_ref(), v.as_ref())),
            None => {
                left = left.checked_sub(1)?;
                let k = std::str::from_utf8(c.bytes16()?).ok()?;
                Some((k, c.bytes32()?))
            }
        })
    }

    pub fn header_count(&self) -> usize {
        match self.headers {
            Headers::Encoded { count, .. } => usize::from(count),
            Headers::List(l) => l.len(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn to_owned(&self) -> Record {
        Record {
            offset: self.offset,
            received_ms: self.received_ms,
            ts_ms: self.ts_ms,
            dlq: self.dlq,
            seq: self.seq,
            key: self.key.map(<[u8]>::to_vec),
            headers: self
                .headers()
                .map(|(k, v)| (header_name(k.as_bytes()), Cow::Owned(v.to_vec())))
                .collect(),
            value: self.value.to_vec(),
        }
    }
}

impl Record {
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            offset: self.offset,
            received_ms: self.received_ms,
            ts_ms: self.ts_ms,
            dlq: self.dlq,
            seq: self.seq,
            key: self.key.as_deref(),
            headers: Headers::List(&self.headers),
            value: &self.value,
        }
    }
}

/// Decodes the record at the start of `buf`; returns it and the bytes it took.
#[cfg(test)]
pub fn decode(buf: &[u8]) -> Result<(Record, usize), Bad> {
    decode_ref(buf).map(|(r, n)| (r.to_owned(), n))
}

/// Decodes the record at the start of `buf`, borrowed from it; returns it and
/// the bytes it took.
pub fn decode_ref(buf: &[u8]) -> Result<(RecordRef<'_>, usize), Bad> {
    let total = record_len(buf)?;
    let len = (total - RECORD_PREFIX_LEN) as u32;
    let want = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = &buf[RECORD_PREFIX_LEN..total];
    if crc(len, body) != want {
        return Err(Bad::Corrupt("checksum mismatch"));
    }
    let mut c = Cursor { b: body, at: 0 };
    let malformed = Bad::Corrupt("malformed record body");
    let offset = c.u64().ok_or(malformed)?;
    let received_ms = c.u64().ok_or(malformed)? as i64;
    let ts = c.u64().ok_or(malformed)? as i64;
    let flags = c.take(1).ok_or(malformed)?[0];
    let seq = c.u64().ok_or(malformed)?;
    let key = c.bytes16().ok_or(malformed)?;
    let count = c.u16().ok_or(malformed)?;
    let start = c.at;
    for _ in 0..count {
        // Checked here so that `headers()` cannot stop early.
        std::str::from_utf8(c.bytes16().ok_or(malformed)?).map_err(|_| malformed)?;
        c.bytes32().ok_or(malformed)?;
    }
    let headers = Headers::Encoded {
        bytes: &body[start..c.at],
        count,
    };
    let value = c.bytes32().ok_or(malformed)?;
    if c.at != body.len() {
        return Err(malformed);
    }
    Ok((
        RecordRef {
            offset,
            received_ms,
            ts_ms: (flags & FLAG_TS != 0).then_some(ts),
            dlq: flags & FLAG_DLQ != 0,
            seq: (flags & FLAG_SEQ != 0).then_some(seq),
            key: (flags & FLAG_KEY != 0).then_some(key),
            headers,
            value,
        },
        total,
    ))
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Some(u64::from_le_bytes(a))
    }
    fn bytes16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn bytes32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// A segment header for a segment whose first record has offset `base`.
pub fn segment_header(base: u64, created_ms: i64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&base.to_le_bytes());
    h[20..28].copy_from_slice(&created_ms.to_le_bytes());
    let c = crc32c::crc32c(&h[..28]);
    h[28..].copy_from_slice(&c.to_le_bytes());
    h
}

/// The format version in a segment header whose magic and checksum are
/// right (`None`: not a segment header at all).
pub fn segment_version(h: &[u8]) -> Option<u16> {
    if h.len() < SEGMENT_HEADER_LEN || &h[..8] != SEGMENT_MAGIC {
        return None;
    }
    let c = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    (crc32c::crc32c(&h[..28]) == c).then(|| u16::from_le_bytes([h[8], h[9]]))
}

/// The base offset in a valid segment header.
pub fn parse_segment_header(h: &[u8]) -> Option<u64> {
    if segment_version(h) != Some(FORMAT_VERSION) {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[12..20]);
    Some(u64::from_le_bytes(b))
}

pub fn checkpoint(generation: u64, acked_through: u64, written_ms: i64) -> [u8; CHECKPOINT_LEN] {
    let mut c = [0u8; CHECKPOINT_LEN];
    c[..8].copy_from_slice(CHECKPOINT_MAGIC);
    c[8..16].copy_from_slice(&generation.to_le_bytes());
    c[16..24].copy_from_slice(&acked_through.to_le_bytes());
    c[24..32].copy_from_slice(&written_ms.to_le_bytes());
    let crc = crc32c::crc32c(&c[..32]);
    c[32..].copy_from_slice(&crc.to_le_bytes());
    c
}

/// (generation, acked-through) of one valid slot.
pub fn parse_checkpoint(c: &[u8]) -> Option<(u64, u64)> {
    if c.len() < CHECKPOINT_LEN || &c[..8] != CHECKPOINT_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([c[32], c[33], c[34], c[35]]);
    if crc32c::crc32c(&c[..32]) != crc {
        return None;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&c[8..16]);
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[16..24]);
    Some((u64::from_le_bytes(g), u64::from_le_bytes(b)))
}

/// The newest valid slot of a checkpoint file.
pub fn parse_checkpoint_file(f: &[u8]) -> Option<(u64, u64)> {
    f.chunks(CHECKPOINT_LEN)
        .take(2)
        .filter_map(parse_checkpoint)
        .max_by_key(|(g, _)| *g)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            offset: 0,
            received_ms: 1_700_000_000_123,
            ts_ms: Some(1_700_000_000_000),
            dlq: false,
            seq: Some(42),
            key: Some(b"dev-1".to_vec()),
            headers: vec![("schema".into(), b"1".as_slice().into())],
            value: br#"{"device_id":"dev-1"}"#.to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(&sample(), 7, &mut buf);
        let mut none = Record {
            key: None,
            seq: None,
            ts_ms: None,
            dlq: true,
            ..sample()
        };
        encode(&none, 8, &mut buf);
        let (a, n) = decode(&buf).unwrap();
        assert_eq!(
            a,
            Record {
                offset: 7,
                ..sample()
            }
        );
        let (b, m) = decode(&buf[n..]).unwrap();
        none.offset = 8;
        assert_eq!(b, none);
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn borrowed_decode_and_view_show_the_same_record() {
        let mut rec = sample();
        rec.headers
            .push(("reason".into(), b"bad_json".as_slice().into()));
        let mut buf = Vec::new();
        encode(&rec, 7, &mut buf);
        rec.offset = 7;
        let (r, n) = decode_ref(&buf).unwrap();
        assert_eq!(n, buf.len());
        let heads = r.headers().collect::<Vec<_>>();
        assert_eq!(heads, rec.view().headers().collect::<Vec<_>>());
        assert_eq!(
            (heads.len(), r.header_count(), rec.view().header_count()),
            (2, 2, 2)
        );
        assert_eq!(r.header("reason"), Some(b"bad_json".as_slice()));
        assert_eq!(r.header("detail"), None);
        assert_eq!((r.key, r.value), (rec.key.as_deref(), &rec.value[..]));
        assert_eq!(r.to_owned(), rec);
        assert_eq!(rec.view().to_owned(), rec);
    }

    #[test]
    fn restamped_records_decode_with_their_new_offset() {
        let mut buf = Vec::new();
        encode(&sample(), 0, &mut buf);
        encode(&sample(), 0, &mut buf);
        let n = restamp(&mut buf, 41).unwrap();
        assert_eq!(restamp(&mut buf[n..], 42).unwrap(), buf.len() - n);
        let (a, _) = decode(&buf).unwrap();
        let (b, _) = decode(&buf[n..]).unwrap();
        assert_eq!((a.offset, b.offset), (41, 42));
        assert_eq!(Record { offset: 0, ..a }, sample());
        assert_eq!(restamp(&mut buf[..n - 1], 1), Err(Bad::Incomplete));
    }

    #[test]
    fn every_cut_is_incomplete_and_every_bit_flip_is_caught() {
        let mut buf = Vec::new();
        encode(&sample(), 3, &mut buf);
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[byte] ^= 1 << bit;
                assert!(decode(&b).is_err(), "flip {byte}:{bit}");
            }
        }
        assert!(decode(&[0u8; 64]).is_err());
    }

    #[test]
    fn headers_and_checkpoints() {
        assert_eq!(parse_segment_header(&segment_header(99, 5)), Some(99));
        let mut h = segment_header(99, 5);
        h[13] ^= 1;
        assert_eq!(parse_segment_header(&h), None);
        // A newer release's header is recognised as such (the spool then
        // refuses to start instead of quarantining it).
        let mut newer = segment_header(7, 5);
        newer[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let c = crc32c::crc32c(&newer[..28]);
        newer[28..32].copy_from_slice(&c.to_le_bytes());
        assert_eq!(parse_segment_header(&newer), None);
        assert_eq!(segment_version(&newer), Some(FORMAT_VERSION + 1));
        assert_eq!(segment_version(&segment_header(7, 5)), Some(FORMAT_VERSION));
        assert_eq!(parse_checkpoint(&checkpoint(3, 1234, 9)), Some((3, 1234)));
        let mut c = checkpoint(3, 1234, 9);
        c[17] ^= 4;
        assert_eq!(parse_checkpoint(&c), None);
        assert_eq!(parse_checkpoint(&[0u8; 3]), None);
        // Two slots: the newest valid one wins; a spoiled slot falls back.
        let mut f = checkpoint(8, 80, 1).to_vec();
        f.extend_from_slice(&checkpoint(7, 70, 1));
        assert_eq!(parse_checkpoint_file(&f), Some((8, 80)));
        f[20] ^= 1;
        assert_eq!(parse_checkpoint_file(&f), Some((7, 70)));
    }
}
