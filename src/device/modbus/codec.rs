//! The register codec: a value of a configured [`DataType`] to and from the 16-bit registers
//! that carry it, in each [`ByteOrder`]. Pure functions; the Modbus link decodes every read
//! block with them, commands encode writes with them, and the simulator serves its map with
//! them.

use crate::config::{ByteOrder, DataType};

/// A value as its registers hold it, before scale and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw {
    /// `int16`, `int32`, `int64`.
    Int(i64),
    /// `uint16`, `uint32`, `uint64`.
    Uint(u64),
    /// `float32` (widened exactly), `float64`.
    Float(f64),
    /// A coil or discrete input.
    Bool(bool),
}

impl Raw {
    /// The value as a sample carries it (an `int64`/`uint64` beyond 2^53 rounds).
    pub fn as_f64(self) -> f64 {
        match self {
            Self::Int(v) => v as f64,
            Self::Uint(v) => v as f64,
            Self::Float(v) => v,
            Self::Bool(b) => f64::from(u8::from(b)),
        }
    }
}

/// Why registers or a value do not fit a data type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// Not as many registers as the type takes.
    #[error("a {data_type} takes {expected} registers, got {got}")]
    Width {
        /// The type.
        data_type: &'static str,
        /// Registers it takes.
        expected: usize,
        /// Registers given.
        got: usize,
    },
    /// `bool` lives in bits, not registers.
    #[error("a bool is a coil or discrete input, not a register")]
    NotARegister,
    /// The value cannot be stored in the type (out of range, not an integer, not finite).
    #[error("{value} does not fit a {data_type}")]
    OutOfRange {
        /// The value asked for.
        value: f64,
        /// The type.
        data_type: &'static str,
    },
}

/// Decodes a value of `data_type` from exactly its registers, in `order`.
pub fn decode(data_type: DataType, order: ByteOrder, words: &[u16]) -> Result<Raw, CodecError> {
    if data_type == DataType::Bool {
        return Err(CodecError::NotARegister);
    }
    let width = usize::from(data_type.width());
    if words.len() != width {
        return Err(CodecError::Width {
            data_type: data_type.as_str(),
            expected: width,
            got: words.len(),
        });
    }
    let mut be = [0u8; 8];
    let bytes = &mut be[8 - 2 * width..];
    let n = words.len();
    for (i, word) in words.iter().enumerate() {
        // Undo the register order first, then the byte swap within each register.
        let slot = if order.words_reversed() { n - 1 - i } else { i };
        let word = if order.bytes_swapped() {
            word.swap_bytes()
        } else {
            *word
        };
        bytes[2 * slot..2 * slot + 2].copy_from_slice(&word.to_be_bytes());
    }
    let unsigned = u64::from_be_bytes(be);
    Ok(match data_type {
        DataType::Int16 => Raw::Int(i64::from(unsigned as u16 as i16)),
        DataType::Int32 => Raw::Int(i64::from(unsigned as u32 as i32)),
        DataType::Int64 => Raw::Int(unsigned as i64),
        DataType::Uint16 | DataType::Uint32 | DataType::Uint64 => Raw::Uint(unsigned),
        DataType::Float32 => Raw::Float(f64::from(f32::from_bits(unsigned as u32))),
        DataType::Float64 => Raw::Float(f64::from_bits(unsigned)),
        DataType::Bool => unreachable!("refused above"),
    })
}

/// Encodes `raw` as `data_type` in `order`. `raw` must be of the type's family and in range
/// (see [`from_f64`] for values from the outside).
pub fn encode(data_type: DataType, order: ByteOrder, raw: Raw) -> Result<Vec<u16>, CodecError> {
    let width = usize::from(data_type.width());
    let out_of_range = || CodecError::OutOfRange {
        value: raw.as_f64(),
        data_type: data_type.as_str(),
    };
    let bits: u64 = match (data_type, raw) {
        (DataType::Bool, _) => return Err(CodecError::NotARegister),
        (DataType::Int16, Raw::Int(v)) => {
            i16::try_from(v).map_err(|_| out_of_range())? as u16 as u64
        }
        (DataType::Int32, Raw::Int(v)) => {
            i32::try_from(v).map_err(|_| out_of_range())? as u32 as u64
        }
        (DataType::Int64, Raw::Int(v)) => v as u64,
        (DataType::Uint16, Raw::Uint(v)) => {
            u64::from(u16::try_from(v).map_err(|_| out_of_range())?)
        }
        (DataType::Uint32, Raw::Uint(v)) => {
            u64::from(u32::try_from(v).map_err(|_| out_of_range())?)
        }
        (DataType::Uint64, Raw::Uint(v)) => v,
        (DataType::Float32, Raw::Float(v)) => u64::from((v as f32).to_bits()),
        (DataType::Float64, Raw::Float(v)) => v.to_bits(),
        _ => return Err(out_of_range()),
    };
    let be = bits.to_be_bytes();
    let bytes = &be[8 - 2 * width..];
    let mut words: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    if order.words_reversed() {
        words.reverse();
    }
    if order.bytes_swapped() {
        for word in &mut words {
            *word = word.swap_bytes();
        }
    }
    Ok(words)
}

const TWO_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_64: f64 = 18_446_744_073_709_551_616.0;

/// The raw value of `data_type` for a number from the outside (a write command): integers must
/// be whole and in range, floats finite, bools 0 or 1.
pub fn from_f64(data_type: DataType, value: f64) -> Result<Raw, CodecError> {
    let err = || CodecError::OutOfRange {
        value,
        data_type: data_type.as_str(),
    };
    if !value.is_finite() {
        return Err(err());
    }
    let whole = value.fract() == 0.0;
    let raw = match data_type {
        DataType::Bool if value == 0.0 || value == 1.0 => Raw::Bool(value == 1.0),
        DataType::Float32 if value.abs() <= f64::from(f32::MAX) => Raw::Float(value),
        DataType::Float64 => Raw::Float(value),
        // 2^63 and 2^64 are exact in f64; the integer ranges end just below them.
        DataType::Int16 | DataType::Int32 | DataType::Int64
            if whole && (-TWO_63..TWO_63).contains(&value) =>
        {
            Raw::Int(value as i64)
        }
        DataType::Uint16 | DataType::Uint32 | DataType::Uint64
            if whole && (0.0..TWO_64).contains(&value) =>
        {
            Raw::Uint(value as u64)
        }
        _ => return Err(err()),
    };
    // Range within the type (int16 vs int64, ...) is checked by encoding.
    if data_type != DataType::Bool {
        encode(data_type, ByteOrder::Abcd, raw)?;
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use DataType::*;

    const ALL_ORDERS: [ByteOrder; 4] = ByteOrder::ALL;

    /// The register images of known values, from the Modbus vendors' tables (value, type,
    /// ABCD, DCBA, BADC, CDAB).
    #[allow(clippy::type_complexity)]
    fn known() -> Vec<(Raw, DataType, [Vec<u16>; 4])> {
        vec![
            (
                Raw::Int(-2),
                Int16,
                [vec![0xFFFE], vec![0xFEFF], vec![0xFEFF], vec![0xFFFE]],
            ),
            (
                Raw::Uint(0x1234),
                Uint16,
                [vec![0x1234], vec![0x3412], vec![0x3412], vec![0x1234]],
            ),
            (
                Raw::Uint(0x1234_5678),
                Uint32,
                [
                    vec![0x1234, 0x5678],
                    vec![0x7856, 0x3412],
                    vec![0x3412, 0x7856],
                    vec![0x5678, 0x1234],
                ],
            ),
            (
                Raw::Int(-123_456_789), // 0xF8A432EB
                Int32,
                [
                    vec![0xF8A4, 0x32EB],
                    vec![0xEB32, 0xA4F8],
                    vec![0xA4F8, 0xEB32],
                    vec![0x32EB, 0xF8A4],
                ],
            ),
            (
                Raw::Float(123.456_001_281_738_28), // 123.456f32 = 0x42F6E979
                Float32,
                [
                    vec![0x42F6, 0xE979],
                    vec![0x79E9, 0xF642],
                    vec![0xF642, 0x79E9],
                    vec![0xE979, 0x42F6],
                ],
            ),
            (
                Raw::Uint(0x0102_0304_0506_0708),
                Uint64,
                [
                    vec![0x0102, 0x0304, 0x0506, 0x0708],
                    vec![0x0807, 0x0605, 0x0403, 0x0201],
                    vec![0x0201, 0x0403, 0x0605, 0x0807],
                    vec![0x0708, 0x0506, 0x0304, 0x0102],
                ],
            ),
            (
                Raw::Int(-2),
                Int64,
                [
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE],
                    vec![0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF],
                    vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF],
                    vec![0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF],
                ],
            ),
            (
                Raw::Float(1.0), // 0x3FF0000000000000
                Float64,
                [
                    vec![0x3FF0, 0, 0, 0],
                    vec![0, 0, 0, 0xF03F],
                    vec![0xF03F, 0, 0, 0],
                    vec![0, 0, 0, 0x3FF0],
                ],
            ),
        ]
    }

    #[test]
    fn every_type_in_every_order_matches_its_known_image() {
        for (raw, data_type, images) in known() {
            for (order, image) in ALL_ORDERS.into_iter().zip(images) {
                let what = format!("{raw:?} as {} {order:?}", data_type.as_str());
                assert_eq!(
                    encode(data_type, order, raw).unwrap(),
                    image,
                    "encode {what}"
                );
                assert_eq!(
                    decode(data_type, order, &image).unwrap(),
                    raw,
                    "decode {what}"
                );
            }
        }
        // Every data type that lives in registers is covered.
        let covered: Vec<_> = known().iter().map(|k| k.1).collect();
        for t in [
            Int16, Uint16, Int32, Uint32, Float32, Int64, Uint64, Float64,
        ] {
            assert!(covered.contains(&t), "{} has no known image", t.as_str());
        }
    }

    #[test]
    fn wrong_widths_and_bools_are_errors() {
        assert!(matches!(
            decode(Int32, ByteOrder::Abcd, &[1]),
            Err(CodecError::Width {
                expected: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            decode(Int16, ByteOrder::Abcd, &[]),
            Err(CodecError::Width { .. })
        ));
        assert_eq!(
            decode(Bool, ByteOrder::Abcd, &[1]),
            Err(CodecError::NotARegister)
        );
        assert!(encode(Int16, ByteOrder::Abcd, Raw::Int(40_000)).is_err());
        assert!(encode(Uint16, ByteOrder::Abcd, Raw::Int(1)).is_err());
    }

    #[test]
    fn values_from_outside_must_fit_their_type() {
        assert_eq!(from_f64(Uint16, 42.0), Ok(Raw::Uint(42)));
        assert_eq!(from_f64(Int16, -32768.0), Ok(Raw::Int(-32768)));
        assert!(from_f64(Int16, 32768.0).is_err());
        assert!(from_f64(Uint16, -1.0).is_err());
        assert!(from_f64(Uint16, 1.5).is_err());
        assert!(from_f64(Uint64, 1.9e19).is_err());
        assert!(from_f64(Float32, 1e39).is_err());
        assert!(from_f64(Float64, f64::NAN).is_err());
        assert_eq!(from_f64(Bool, 1.0), Ok(Raw::Bool(true)));
        assert!(from_f64(Bool, 2.0).is_err());
    }

    fn register_type() -> impl Strategy<Value = DataType> {
        prop::sample::select(vec![
            Int16, Uint16, Int32, Uint32, Float32, Int64, Uint64, Float64,
        ])
    }

    fn order() -> impl Strategy<Value = ByteOrder> {
        prop::sample::select(ALL_ORDERS.to_vec())
    }

    /// A raw value that fits `data_type`, any bit pattern of its width.
    fn raw_for(data_type: DataType, bits: u64) -> Raw {
        match data_type {
            Int16 => Raw::Int(i64::from(bits as u16 as i16)),
            Int32 => Raw::Int(i64::from(bits as u32 as i32)),
            Int64 => Raw::Int(bits as i64),
            Uint16 => Raw::Uint(bits & 0xFFFF),
            Uint32 => Raw::Uint(bits & 0xFFFF_FFFF),
            Uint64 => Raw::Uint(bits),
            Float32 => Raw::Float(f64::from(f32::from_bits(bits as u32))),
            _ => Raw::Float(f64::from_bits(bits)),
        }
    }

    fn same(a: Raw, b: Raw) -> bool {
        match (a, b) {
            (Raw::Float(x), Raw::Float(y)) => {
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            }
            _ => a == b,
        }
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(data_type in register_type(), order in order(), bits in any::<u64>()) {
            let raw = raw_for(data_type, bits);
            let words = encode(data_type, order, raw).unwrap();
            prop_assert_eq!(words.len(), usize::from(data_type.width()));
            let back = decode(data_type, order, &words).unwrap();
            prop_assert!(same(raw, back), "{:?} -> {:?} -> {:?}", raw, words, back);
        }

        #[test]
        fn decoding_any_registers_never_panics(data_type in register_type(), order in order(), words in prop::collection::vec(any::<u16>(), 0..6)) {
            let result = decode(data_type, order, &words);
            prop_assert_eq!(result.is_ok(), words.len() == usize::from(data_type.width()));
            // Decoding then encoding gives the registers back (NaN payloads included).
            if let Ok(raw) = result
                && !matches!(raw, Raw::Float(f) if f.is_nan() && data_type == Float32)
            {
                prop_assert_eq!(encode(data_type, order, raw).unwrap(), words);
            }
        }

        #[test]
        fn any_number_from_outside_is_a_value_or_an_error(data_type in register_type(), value in any::<f64>()) {
            if let Ok(raw) = from_f64(data_type, value) {
                prop_assert!(encode(data_type, ByteOrder::Abcd, raw).is_ok());
            }
        }
    }
}
