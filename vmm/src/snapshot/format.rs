//! The snapshot state file: a fixed header, then the VM's state encoded with
//! `serde` and `bitcode` (compact, and what Firecracker's snapshots use since
//! it left bincode, unmaintained since 2025).
//!
//! ```text
//!  offset  size  field
//!       0     8  magic "MVMMSNAP"
//!       8     4  format version (little endian)
//!      12     4  reserved, 0
//!      16     8  payload length
//!      24     8  CRC-64/XZ of the payload
//!      32     -  payload
//! ```
//!
//! The file is hostile input (../shared/ADVERSARIAL.md): everything is
//! checked before the payload is decoded — the length against the file and
//! [`MAX_PAYLOAD`], the version, the checksum — and the decoder works on a
//! slice already in memory, so no length inside the payload can make it read
//! past the file; the decoded state is validated again by whoever uses it
//! (`snapshot::restore`). Each refusal is one clear line.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"MVMMSNAP";
/// The layout of the payload this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_SIZE: usize = 32;
/// Largest payload accepted: 254 vCPUs of registers, MSRs and LAPIC pages
/// and every device's state fit in a few MiB.
pub const MAX_PAYLOAD: u64 = 64 << 20;

const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a state file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than its header or than the payload the header announces.
    #[error("The snapshot state is truncated ({found} bytes, {needed} expected)")]
    Truncated {
        /// Bytes the file should have.
        needed: u64,
        /// Bytes it has.
        found: u64,
    },
    /// Not a minivmm snapshot.
    #[error("Not a minivmm snapshot state file (bad magic)")]
    Magic,
    /// Written by a build with another payload layout.
    #[error(
        "Snapshot format version {found} is not supported (this minivmm reads {FORMAT_VERSION})"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
    /// Bytes after the payload, a nonzero reserved word, or a payload
    /// larger than [`MAX_PAYLOAD`].
    #[error("The snapshot state is malformed: {0}")]
    Malformed(&'static str),
    /// The payload is not what was written.
    #[error("The snapshot state is corrupt (checksum {found:#018x}, expected {expected:#018x})")]
    Checksum {
        /// The header's checksum.
        expected: u64,
        /// The payload's.
        found: u64,
    },
    /// The payload does not decode as this version's state.
    #[error("The snapshot state does not decode: {0}")]
    Decode(String),
}

/// The state file's bytes for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = bitcode::serialize(state).map_err(|e| FormatError::Decode(e.to_string()))?;
    Ok(seal(&payload))
}

/// A state file around an already encoded `payload` (for tests and the
/// fuzz target, which reach the decoder without computing checksums).
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&CRC.checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The state in a file's bytes, after every check of the header.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    let found = bytes.len() as u64;
    let header = bytes.get(..HEADER_SIZE).ok_or(FormatError::Truncated {
        needed: HEADER_SIZE as u64,
        found,
    })?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let quad = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if header[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    if word(8) != FORMAT_VERSION {
        return Err(FormatError::Version { found: word(8) });
    }
    if word(12) != 0 {
        return Err(FormatError::Malformed("reserved header bits are set"));
    }
    let length = quad(16);
    if length > MAX_PAYLOAD {
        return Err(FormatError::Malformed("the payload is larger than 64 MiB"));
    }
    let needed = HEADER_SIZE as u64 + length;
    if found < needed {
        return Err(FormatError::Truncated { needed, found });
    }
    if found > needed {
        return Err(FormatError::Malformed("bytes follow the payload"));
    }
    let payload = &bytes[HEADER_SIZE..];
    let (expected, sum) = (quad(24), CRC.checksum(payload));
    if expected != sum {
        return Err(FormatError::Checksum {
            expected,
            found: sum,
        });
    }
    bitcode::deserialize(payload).map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
        flag: Option<bool>,
    }

    fn state() -> State {
        State {
            name: "vcpu0".into(),
            regs: (0..64).map(|i| i * 0x1111).collect(),
            flag: Some(true),
        }
    }

    #[test]
    fn state_round_trips() {
        let bytes = encode(&state()).unwrap();
        assert_eq!(&bytes[..8], b"MVMMSNAP");
        assert_eq!(decode::<State>(&bytes).unwrap(), state());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&state()).unwrap();
        for len in 0..bytes.len() {
            let e = decode::<State>(&bytes[..len]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated { .. }), "{len}: {e}");
        }
    }

    #[test]
    fn magic_version_reserved_length_and_trailing_bytes_are_checked() {
        let good = encode(&state()).unwrap();
        let with = |at: usize, b: u8| {
            let mut v = good.clone();
            v[at] = b;
            decode::<State>(&v).unwrap_err()
        };
        assert_eq!(with(0, b'X'), FormatError::Magic);
        assert_eq!(with(8, 2), FormatError::Version { found: 2 });
        assert!(matches!(with(12, 1), FormatError::Malformed(_)));
        assert!(matches!(with(23, 0x80), FormatError::Malformed(_)));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode::<State>(&longer),
            Err(FormatError::Malformed(_))
        ));
        let e = with(0, b'X').to_string();
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn any_changed_payload_byte_fails_the_checksum() {
        let good = encode(&state()).unwrap();
        for at in HEADER_SIZE..good.len() {
            let mut v = good.clone();
            v[at] ^= 0x01;
            assert!(
                matches!(decode::<State>(&v), Err(FormatError::Checksum { .. })),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_payload_of_another_shape_with_a_valid_checksum_is_a_decode_error() {
        #[derive(Serialize)]
        struct Other {
            x: u8,
        }
        let bytes = encode(&Other { x: 7 }).unwrap();
        assert!(matches!(
            decode::<State>(&bytes),
            Err(FormatError::Decode(_))
        ));
    }
}
