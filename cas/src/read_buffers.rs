//! Buffers for large streamed reads, used again once the network has sent them.
//!
//! Why: every chunk of a large read used to be a fresh 1 MiB allocation. glibc gave each freed
//! megabyte back to the kernel (`madvise`), and the next chunk's `read` faulted it in again
//! page by page, zero-filled: `perf` of `cache-server` streaming a 1 GiB blob put those page
//! faults, the zeroing and the `madvise` calls at about a tenth of the server's read CPU. A
//! pooled buffer goes back here when the last [`Bytes`] pointing into it is dropped (after
//! HTTP/2 wrote it to the socket), still mapped, so a steady stream reads into the same few
//! megabytes. At most [`KEPT`] buffers are kept; more in flight at once are simply freed.

use bytes::Bytes;
use parking_lot::Mutex;

/// Capacity of a pooled buffer: the chunk size of streamed reads.
const POOLED_BYTES: usize = crate::seams::READ_CHUNK_BYTES;
/// Reads smaller than this get an allocation of their own size, not a pooled megabyte.
const POOLED_FROM: usize = POOLED_BYTES / 4;
/// Buffers kept for reuse (8 MiB at most, whatever the number of readers).
const KEPT: usize = 8;

/// The pool streamed blob reads take their buffers from.
pub(crate) static READ_BUFFERS: BufferPool = BufferPool::new();

/// Free pool-sized buffers, at most [`KEPT`].
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    const fn new() -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer with room for `size` bytes: a pooled one when `size` is large enough
    /// for the pool and one is free.
    pub(crate) fn take(&self, size: usize) -> Vec<u8> {
        if (POOLED_FROM..=POOLED_BYTES).contains(&size) {
            let buffer = self
                .free
                .lock()
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(POOLED_BYTES));
            debug_assert!(buffer.is_empty() && buffer.capacity() >= size);
            buffer
        } else {
            Vec::with_capacity(size)
        }
    }

    /// `buffer` as `Bytes` without a copy; a pool-sized buffer returns to the pool when the
    /// last `Bytes` (or slice of it) is dropped.
    pub(crate) fn lend(&'static self, buffer: Vec<u8>) -> Bytes {
        if buffer.capacity() == POOLED_BYTES {
            Bytes::from_owner(Pooled { buffer, pool: self })
        } else {
            Bytes::from(buffer)
        }
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        let mut free = self.free.lock();
        if free.len() < KEPT {
            free.push(buffer);
        }
    }
}

/// A pooled buffer lent to a `Bytes`.
struct Pooled {
    buffer: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_to_the_pool_when_its_last_slice_is_dropped() {
        static POOL: BufferPool = BufferPool::new();
        let mut buffer = POOL.take(POOLED_BYTES);
        buffer.extend(std::iter::repeat_n(7u8, POOLED_BYTES));
        let address = buffer.as_ptr();
        let mut bytes = POOL.lend(buffer);
        let head = bytes.split_to(10);
        assert_eq!((head.len(), bytes.len()), (10, POOLED_BYTES - 10));
        assert!(head.iter().chain(bytes.iter()).all(|&b| b == 7));
        drop(bytes);
        // Still lent out through `head`: not free yet.
        assert!(POOL.free.lock().is_empty());
        drop(head);
        let again = POOL
            .free
            .lock()
            .iter()
            .find(|b| b.as_ptr() == address)
            .map(|b| (b.len(), b.capacity()));
        assert_eq!(
            again,
            Some((0, POOLED_BYTES)),
            "returned empty, same capacity"
        );
        let taken = POOL.take(POOLED_BYTES);
        assert_eq!(taken.as_ptr(), address, "and taken again");
    }

    #[test]
    fn small_and_oversized_reads_are_not_pooled() {
        static POOL: BufferPool = BufferPool::new();
        for size in [0, 1, POOLED_FROM - 1, POOLED_BYTES + 1] {
            let buffer = POOL.take(size);
            assert_eq!(buffer.capacity(), size, "size {size}");
            drop(POOL.lend(buffer));
        }
        assert!(POOL.free.lock().is_empty());
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        static POOL: BufferPool = BufferPool::new();
        let lent: Vec<Bytes> = (0..KEPT * 3)
            .map(|_| POOL.lend(POOL.take(POOLED_BYTES)))
            .collect();
        drop(lent);
        assert_eq!(POOL.free.lock().len(), KEPT);
    }
}
