//! Buffers handed back for reuse.

use std::sync::{Arc, Mutex};

/// Emptied buffers on their way back to where they are filled (batch buffers
/// to the pipeline, [`Received`](super::source::Received) to the MQTT source), so that
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
        crate::sync::lock(&self.0 .0)
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

/// Batch buffers.
pub type BufPool = Pool<Vec<u8>>;
