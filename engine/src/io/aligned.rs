//! Block-aligned heap buffers for O_DIRECT.

use std::alloc::{self, Layout};
use std::fmt;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

use compio::buf::{IoBuf, IoBufMut, SetBufInit};

use crate::constants::{block_bytes, shard_writes_inflight_max, write_bytes_max};

/// A zero-initialised buffer whose address and capacity are multiples of [`block_bytes`]. `len` is the
/// number of meaningful bytes; the whole capacity is always initialised memory.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no interior sharing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `capacity` bytes, rounded up to whole blocks.
    pub fn new(capacity: usize) -> AlignedBuf {
        let capacity = align_up(capacity.max(1) as u64) as usize;
        let layout = Self::layout(capacity);
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len: 0,
            capacity,
        }
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, block_bytes).expect("aligned buffer layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.full()[..self.len]
    }

    /// The meaningful bytes, to patch in place (a length or a CRC filled in after the fact).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.full_mut()[..len]
    }

    /// The whole capacity, meaningful or not.
    pub fn full(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.capacity) }
    }

    fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `full`, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// Append as much of `bytes` as fits; returns how many were taken.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.remaining());
        let len = self.len;
        self.full_mut()[len..len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// Forget the content (the bytes stay; `zero_padding` cleans what a write will carry).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Length rounded up to whole blocks: what an O_DIRECT write of this buffer must cover.
    pub fn padded_len(&self) -> usize {
        align_up(self.len as u64) as usize
    }

    /// Zero the bytes between `len` and `padded_len`, so a write never puts stale bytes after the
    /// log's end (recovery reads zeros there as the end of the log).
    pub fn zero_padding(&mut self) {
        let (len, padded) = (self.len, self.padded_len());
        self.full_mut()[len..padded].fill(0);
    }

    /// Zero the meaningful bytes from `from` on (a read that found fewer bytes than it covers).
    pub fn zero_tail(&mut self, from: usize) {
        let len = self.len;
        self.full_mut()[from..len].fill(0);
    }

    /// Make the buffer `len` zero bytes (a write that lays out file space ahead of the log).
    pub fn fill_zeros(&mut self, len: usize) {
        self.set_len(len);
        self.full_mut()[..len].fill(0);
    }

    /// Make the first `len` bytes meaningful (used after a read, and to cover padding for a write).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "set_len {len} beyond capacity {}",
            self.capacity
        );
        self.len = len;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

// SAFETY: pointer, len and capacity describe this buffer's live allocation.
unsafe impl IoBuf for AlignedBuf {
    fn as_buf_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn buf_len(&self) -> usize {
        self.len
    }
    fn buf_capacity(&self) -> usize {
        self.capacity
    }
}

impl SetBufInit for AlignedBuf {
    unsafe fn set_buf_init(&mut self, len: usize) {
        if len > self.len {
            self.set_len(len);
        }
    }
}

// SAFETY: the mutable pointer covers the same allocation as `as_buf_ptr`.
unsafe impl IoBufMut for AlignedBuf {
    fn as_buf_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn as_mut_slice(&mut self) -> &mut [MaybeUninit<u8>] {
        let len = self.len;
        let capacity = self.capacity;
        // SAFETY: initialised bytes are valid MaybeUninit<u8>; the range lies in the allocation.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr().add(len).cast::<MaybeUninit<u8>>(),
                capacity - len,
            )
        }
    }
}

/// A shard's write buffers: full-size ones (`write_bytes_max`), all made at start-up, and
/// single-block ones for a write's carried block and partial last block, made on first need and
/// kept for reuse, so the write path does not allocate.
pub(crate) struct BufferPool {
    large: Vec<AlignedBuf>,
    small: Vec<AlignedBuf>,
}

impl BufferPool {
    pub fn new(large: usize) -> BufferPool {
        BufferPool {
            large: (0..large)
                .map(|_| AlignedBuf::new(write_bytes_max))
                .collect(),
            small: Vec::new(),
        }
    }

    pub fn has_large(&self) -> bool {
        !self.large.is_empty()
    }

    pub fn take_large(&mut self) -> Option<AlignedBuf> {
        self.large.pop()
    }

    pub fn take_small(&mut self) -> AlignedBuf {
        self.small
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(block_bytes))
    }

    /// Take a buffer back after its write completed.
    pub fn give_back(&mut self, mut buf: AlignedBuf) {
        buf.clear();
        if buf.capacity() >= write_bytes_max {
            self.large.push(buf);
        } else if self.small.len() < 2 * shard_writes_inflight_max {
            self.small.push(buf);
        }
    }
}

pub fn align_down(position: u64) -> u64 {
    position & !(block_bytes as u64 - 1)
}

pub fn align_up(position: u64) -> u64 {
    align_down(position + block_bytes as u64 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_padding() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.full().as_ptr() as usize % block_bytes, 0);
        assert_eq!(b.extend_from_slice(&[7; 10]), 10);
        assert_eq!(b.padded_len(), 4096);
        b.set_len(10);
        b.full_mut()[10..20].fill(9);
        b.zero_padding();
        assert!(b.full()[10..4096].iter().all(|&x| x == 0));
        b.clear();
        assert!(b.is_empty());
        assert_eq!(
            (align_down(4097), align_up(4097), align_up(4096)),
            (4096, 8192, 4096)
        );
    }
}
