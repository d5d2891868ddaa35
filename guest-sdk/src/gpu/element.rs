use std::fmt;

use half::{bf16, f16};

use super::raw;

/// The element type of a [`Buffer`](super::Buffer), as the host knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16 ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]): f32's exponent, 8 bits of mantissa.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// `"f32"`, `"f16"` or `"bf16"`, as in the WIT.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    pub(crate) fn to_raw(self) -> raw::Dtype {
        match self {
            Dtype::F32 => raw::Dtype::F32,
            Dtype::F16 => raw::Dtype::F16,
            Dtype::Bf16 => raw::Dtype::Bf16,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type a GPU buffer can hold: `f32`, [`half::f16`] or [`half::bf16`].
///
/// Sealed: these are the element types the host implements.
pub trait Element:
    sealed::Sealed + Copy + Default + PartialEq + PartialOrd + fmt::Debug + Send + Sync + 'static
{
    /// The host's name for this type.
    const DTYPE: Dtype;

    /// The nearest value of this type (round to nearest, ties to even).
    fn from_f32(value: f32) -> Self;

    /// This value as an `f32` (exact for all three types).
    fn to_f32(self) -> f32;
}

pub(crate) mod sealed {
    /// The byte layout on the wire; private so no other type can be an `Element`.
    pub trait Sealed: Sized {
        fn extend_le(self, out: &mut Vec<u8>);
        /// `bytes` is exactly one element long.
        fn from_le(bytes: &[u8]) -> Self;
    }
}

macro_rules! element {
    ($ty:ty, $dtype:expr, $from_f32:expr, $to_f32:expr) => {
        impl Element for $ty {
            const DTYPE: Dtype = $dtype;

            fn from_f32(value: f32) -> Self {
                $from_f32(value)
            }

            fn to_f32(self) -> f32 {
                $to_f32(self)
            }
        }

        impl sealed::Sealed for $ty {
            fn extend_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }

            fn from_le(bytes: &[u8]) -> Self {
                <$ty>::from_le_bytes(bytes.try_into().expect("one element's bytes"))
            }
        }
    };
}

element!(f32, Dtype::F32, |v: f32| v, |v: f32| v);
element!(f16, Dtype::F16, f16::from_f32, f16::to_f32);
element!(bf16, Dtype::Bf16, bf16::from_f32, bf16::to_f32);

/// Appends `data` to `out` as little-endian bytes, the layout the host expects.
pub(crate) fn encode_into<T: Element>(data: &[T], out: &mut Vec<u8>) {
    out.reserve(data.len() * T::DTYPE.size_bytes());
    for &value in data {
        value.extend_le(out);
    }
}

/// Appends the elements in `bytes` (a whole number of them) to `out`.
pub(crate) fn decode_into<T: Element>(bytes: &[u8], out: &mut Vec<T>) {
    let size = T::DTYPE.size_bytes();
    debug_assert_eq!(bytes.len() % size, 0, "the host returns whole elements");
    out.extend(bytes.chunks_exact(size).map(T::from_le));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Element>(values: &[T]) -> (Vec<u8>, Vec<T>) {
        let mut bytes = Vec::new();
        encode_into(values, &mut bytes);
        let mut back = Vec::new();
        decode_into(&bytes, &mut back);
        (bytes, back)
    }

    #[test]
    fn f32_is_little_endian_ieee() {
        let (bytes, back) = round_trip(&[1.0f32, -2.5]);
        assert_eq!(bytes, [0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x20, 0xc0]);
        assert_eq!(back, [1.0, -2.5]);
    }

    #[test]
    fn half_types_are_two_little_endian_bytes() {
        let (bytes, back) = round_trip(&[f16::from_f32(1.0), f16::from_f32(-2.0)]);
        assert_eq!(bytes, [0x00, 0x3c, 0x00, 0xc0]);
        assert_eq!(back, [f16::from_f32(1.0), f16::from_f32(-2.0)]);
        let (bytes, back) = round_trip(&[bf16::from_f32(1.0), bf16::from_f32(-2.0)]);
        assert_eq!(bytes, [0x80, 0x3f, 0x00, 0xc0], "bf16 is the high half of the f32");
        assert_eq!(back, [bf16::from_f32(1.0), bf16::from_f32(-2.0)]);
    }

    #[test]
    fn dtypes_match_the_rust_types() {
        assert_eq!((f32::DTYPE, f16::DTYPE, bf16::DTYPE), (Dtype::F32, Dtype::F16, Dtype::Bf16));
        assert_eq!([Dtype::F32, Dtype::F16, Dtype::Bf16].map(Dtype::size_bytes), [4, 2, 2]);
        assert_eq!(Dtype::Bf16.to_string(), "bf16");
    }

    #[test]
    fn from_f32_rounds_to_nearest() {
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 512.0).to_f32(), 1.0, "below bf16's half step rounds down");
        assert_eq!(f16::from_f32(65504.0).to_f32(), 65504.0);
        assert_eq!(<f32 as Element>::from_f32(0.1).to_f32(), 0.1);
    }
}
