use std::fmt;
use std::marker::PhantomData;

use super::element::{decode_into, encode_into};
use super::{Dtype, Element, GpuError, raw};

/// Bytes moved per host call: big copies go in pieces, so guest memory holds one
/// piece of encoded bytes at a time rather than a second copy of the data.
const CHUNK_BYTES: usize = 4 << 20;

/// Device memory holding [`len`](Buffer::len) elements of `T`.
///
/// Zeroed when made, freed when dropped, and counted against this worker's
/// `gpu_memory` in between. The guest sees a handle, never a device pointer;
/// the host checks every offset and length. A buffer may live in a `static`
/// (say, model weights uploaded once in `init`) and is used through `&self`:
/// the device orders all of one worker's work on its stream.
///
/// ```no_run
/// use beamlet_sdk::gpu::Buffer;
///
/// let x = Buffer::from_slice(&[1.0f32, -2.0, 3.0])?;
/// beamlet_sdk::gpu::relu(&x)?;
/// assert_eq!(x.to_vec()?, [1.0, 0.0, 3.0]);
/// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
/// ```
pub struct Buffer<T: Element> {
    raw: raw::Buffer,
    len: u64,
    _element: PhantomData<T>,
}

impl<T: Element> Buffer<T> {
    /// Allocates `len` zeroed elements.
    ///
    /// Fails with [`GpuError::QuotaExceeded`] past this worker's `gpu_memory`,
    /// [`GpuError::OutOfMemory`] when the device is full, and
    /// [`GpuError::Unavailable`] when the app has no GPU.
    pub fn zeros(len: u64) -> Result<Self, GpuError> {
        let raw = raw::Buffer::alloc(T::DTYPE.to_raw(), len)?;
        Ok(Buffer { raw, len, _element: PhantomData })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn from_slice(data: &[T]) -> Result<Self, GpuError> {
        let buffer = Self::zeros(data.len() as u64)?;
        buffer.write(0, data)?;
        Ok(buffer)
    }

    /// Allocates `len` elements and sets element `i` to `f(i)`, generating and
    /// uploading a piece at a time: large inputs never sit whole in guest memory.
    ///
    /// ```no_run
    /// use beamlet_sdk::gpu::Buffer;
    ///
    /// let ramp = Buffer::<f32>::from_fn(1 << 26, |i| (i % 1000) as f32)?;
    /// # Ok::<(), beamlet_sdk::gpu::GpuError>(())
    /// ```
    pub fn from_fn(len: u64, mut f: impl FnMut(u64) -> T) -> Result<Self, GpuError> {
        let buffer = Self::zeros(len)?;
        let step = chunk_elements::<T>() as u64;
        let mut piece = Vec::with_capacity(step.min(len) as usize);
        let mut start = 0;
        while start < len {
            let end = len.min(start + step);
            piece.clear();
            piece.extend((start..end).map(&mut f));
            buffer.write(start, &piece)?;
            start = end;
        }
        Ok(buffer)
    }

    /// Length in elements.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type, `T::DTYPE`.
    pub fn dtype(&self) -> Dtype {
        T::DTYPE
    }

    /// Size in bytes, as counted against the worker's `gpu_memory`.
    pub fn size_bytes(&self) -> u64 {
        self.len.saturating_mul(T::DTYPE.size_bytes() as u64)
    }

    /// Copies `data` in, starting at element `offset`.
    ///
    /// Queued on the worker's stream after the work before it. Fails with
    /// [`GpuError::OutOfBounds`] (writing nothing) if it would reach past the end.
    pub fn write(&self, offset: u64, data: &[T]) -> Result<(), GpuError> {
        check_range(offset, data.len() as u64, self.len)?;
        let mut bytes = Vec::with_capacity(CHUNK_BYTES.min(std::mem::size_of_val(data)));
        let mut at = offset;
        for piece in data.chunks(chunk_elements::<T>()) {
            bytes.clear();
            encode_into(piece, &mut bytes);
            self.raw.write(at, &bytes)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Copies `len` elements out, from element `offset`, once the work queued
    /// before has finished.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<T>, GpuError> {
        check_range(offset, len as u64, self.len)?;
        let mut out = Vec::with_capacity(len);
        let step = chunk_elements::<T>();
        let mut done = 0;
        while done < len {
            let count = step.min(len - done);
            let bytes = self.raw.read(offset + done as u64, count as u64)?;
            decode_into(&bytes, &mut out);
            done += count;
        }
        Ok(out)
    }

    /// Copies the whole buffer out (see [`Buffer::read`]).
    ///
    /// Fails with [`GpuError::InvalidArgument`] if the buffer is larger than guest
    /// memory can address; read it in pieces then.
    pub fn to_vec(&self) -> Result<Vec<T>, GpuError> {
        let len = usize::try_from(self.len).map_err(|_| {
            GpuError::InvalidArgument(format!(
                "a buffer of {} elements does not fit in guest memory; read it in pieces",
                self.len
            ))
        })?;
        self.read(0, len)
    }

    pub(crate) fn raw(&self) -> &raw::Buffer {
        &self.raw
    }
}

impl<T: Element> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer").field("dtype", &T::DTYPE).field("len", &self.len).finish()
    }
}

fn chunk_elements<T: Element>() -> usize {
    CHUNK_BYTES / T::DTYPE.size_bytes()
}

/// The same check the host makes, made first so a large copy fails before its
/// first piece is sent rather than halfway through.
fn check_range(offset: u64, count: u64, len: u64) -> Result<(), GpuError> {
    match offset.checked_add(count) {
        Some(end) if end <= len => Ok(()),
        _ => Err(GpuError::OutOfBounds(format!(
            "elements {offset}..{} of a buffer of {len} elements",
            offset.saturating_add(count)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_must_end_within_the_buffer() {
        assert_eq!(check_range(0, 10, 10), Ok(()));
        assert_eq!(check_range(10, 0, 10), Ok(()));
        assert_eq!(check_range(0, 0, 0), Ok(()));
        assert_eq!(
            check_range(8, 3, 10),
            Err(GpuError::OutOfBounds("elements 8..11 of a buffer of 10 elements".into()))
        );
        assert!(check_range(u64::MAX, 2, 10).is_err(), "overflow is out of bounds, not a wrap");
    }

    #[test]
    fn pieces_are_a_whole_number_of_elements() {
        assert_eq!(chunk_elements::<f32>() * 4, CHUNK_BYTES);
        assert_eq!(chunk_elements::<half::bf16>() * 2, CHUNK_BYTES);
    }
}
