//! Buffers for large streamed reads, used again once the network has sent them.
//!
//! Why: every chunk of a large read used to be a fresh 1 MiB allocation. glibc gave each freed
//! megabyte back to the kernel (`madvise`), and the next chunk's `read` faulted it in again
//! page by page, zero-filled: `perf` of `cache-server` streaming a 1 GiB blob put those page
//! faults, the zeroing and the `madvise` calls at about a tenth of the server's read CPU. A
//! pooled buffer goes back here when the last [`Bytes`] pointing into it is dropped (after
//! HTTP/2 wrote it to the socket), still mapped, so a steady stream reads into the same few
//! megabytes.
//!
//! Each pooled buffer is an anonymous mapping of its own, not a heap allocation: a megabyte
//! kept on the heap pins the heap around it, and a first version that pooled `Vec`s raised the
//! server's resident memory by 20–30 MiB after a few streams (glibc could no longer trim the
//! space freed around them). A mapping costs the pool exactly its size while kept, at most
//! [`KEPT`] of them, and is unmapped when more are in flight than that.

use std::io;

use bytes::Bytes;
use memmap2::MmapMut;
use parking_lot::Mutex;

/// Capacity of a pooled buffer: the chunk size of streamed reads.
const POOLED_BYTES: usize = crate::seams::READ_CHUNK_BYTES;
/// Reads smaller than this get an allocation of their own size, not a pooled megabyte.
const POOLED_FROM: usize = POOLED_BYTES / 4;
/// Buffers kept for reuse (8 MiB at most, whatever the number of readers).
const KEPT: usize = 8;

/// The pool streamed blob reads take their buffers from.
pub(crate) static READ_BUFFERS: BufferPool = BufferPool::new();

/// Free pooled buffers, at most [`KEPT`].
pub(crate) struct BufferPool {
    free: Mutex<Vec<MmapMut>>,
}

impl BufferPool {
    const fn new() -> Self {
        BufferPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// `size` bytes filled by `fill` (given the whole buffer, returning how many bytes it
    /// wrote at its start), as `Bytes` without a copy: in a pooled buffer when `size` is large
    /// enough for the pool, which the buffer returns to when the last `Bytes` (or slice of it)
    /// is dropped. Only the bytes `fill` reports are ever visible, whatever a reused buffer
    /// held before.
    pub(crate) fn filled(
        &'static self,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<Bytes> {
        if !(POOLED_FROM..=POOLED_BYTES).contains(&size) {
            let mut buffer = vec![0u8; size];
            let len = fill(&mut buffer)?;
            buffer.truncate(len);
            return Ok(Bytes::from(buffer));
        }
        let taken = self.free.lock().pop();
        let mut map = match taken {
            Some(map) => map,
            None => MmapMut::map_anon(POOLED_BYTES)?,
        };
        let len = match fill(&mut map[..size]) {
            Ok(len) => len.min(size),
            Err(e) => {
                self.give_back(map);
                return Err(e);
            }
        };
        Ok(Bytes::from_owner(Pooled {
            map: Some(map),
            len,
            pool: self,
        }))
    }

    fn give_back(&self, map: MmapMut) {
        let mut free = self.free.lock();
        if free.len() < KEPT {
            free.push(map);
        }
    }
}

/// A pooled buffer lent to a `Bytes`: its first `len` bytes.
struct Pooled {
    map: Option<MmapMut>,
    len: usize,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |map| &map[..self.len])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(map) = self.map.take() {
            self.pool.give_back(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_with(byte: u8, count: usize) -> impl FnOnce(&mut [u8]) -> io::Result<usize> {
        move |buffer: &mut [u8]| {
            buffer[..count].fill(byte);
            Ok(count)
        }
    }

    #[test]
    fn a_buffer_returns_to_the_pool_when_its_last_slice_is_dropped() {
        static POOL: BufferPool = BufferPool::new();
        let mut bytes = POOL
            .filled(POOLED_BYTES, fill_with(7, POOLED_BYTES))
            .unwrap();
        let address = bytes.as_ptr();
        let head = bytes.split_to(10);
        assert_eq!((head.len(), bytes.len()), (10, POOLED_BYTES - 10));
        assert!(head.iter().chain(bytes.iter()).all(|&b| b == 7));
        drop(bytes);
        // Still lent out through `head`: not free yet.
        assert!(POOL.free.lock().is_empty());
        drop(head);
        assert_eq!(POOL.free.lock().len(), 1);
        // Taken again: the same memory, and only what the new fill wrote is visible.
        let again = POOL.filled(POOLED_BYTES, fill_with(9, 300_000)).unwrap();
        assert_eq!(again.as_ptr(), address);
        assert_eq!(again.len(), 300_000);
        assert!(again.iter().all(|&b| b == 9));
    }

    #[test]
    fn a_failed_fill_shows_nothing_and_keeps_the_buffer() {
        static POOL: BufferPool = BufferPool::new();
        let error = POOL
            .filled(POOLED_BYTES, |_| Err(io::Error::other("disk gone")))
            .unwrap_err();
        assert_eq!(error.to_string(), "disk gone");
        assert_eq!(POOL.free.lock().len(), 1);
    }

    #[test]
    fn small_and_oversized_reads_are_not_pooled() {
        static POOL: BufferPool = BufferPool::new();
        for size in [0, 1, POOLED_FROM - 1, POOLED_BYTES + 1] {
            let bytes = POOL.filled(size, fill_with(3, size / 2)).unwrap();
            assert_eq!(bytes.len(), size / 2, "size {size}");
            assert!(bytes.iter().all(|&b| b == 3));
        }
        assert!(POOL.free.lock().is_empty());
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        static POOL: BufferPool = BufferPool::new();
        let lent: Vec<Bytes> = (0..KEPT * 3)
            .map(|_| POOL.filled(POOLED_BYTES, fill_with(1, 1)).unwrap())
            .collect();
        drop(lent);
        assert_eq!(POOL.free.lock().len(), KEPT);
    }
}
