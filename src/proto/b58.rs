//! base58 with the Bitcoin alphabet, no checksum (PROTOCOL.md §2.2), with the
//! length checks every decoder must make.

use super::ProtoError;

pub fn encode(bytes: &[u8]) -> String {
    bs58::encode(bytes).into_string()
}

/// Decode exactly `N` bytes (keys: 32, signatures: 64).
pub fn decode_array<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], ProtoError> {
    // A 64-byte value is at most 88 characters; anything far longer is not worth decoding.
    if s.len() > 2 * N + 8 {
        return Err(ProtoError::TooLarge {
            what,
            max: 2 * N + 8,
            got: s.len(),
        });
    }
    let v = bs58::decode(s)
        .into_vec()
        .map_err(|_| ProtoError::Base58 { what })?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| ProtoError::Length {
        what,
        expected: N,
        got: v.len(),
    })
}

/// Decode a blob of unbounded length, with the character cap checked first.
pub fn decode_vec(s: &str, what: &'static str, max_chars: usize) -> Result<Vec<u8>, ProtoError> {
    if s.len() > max_chars {
        return Err(ProtoError::TooLarge {
            what,
            max: max_chars,
            got: s.len(),
        });
    }
    bs58::decode(s)
        .into_vec()
        .map_err(|_| ProtoError::Base58 { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_key_is_all_ones() {
        assert_eq!(encode(&[0u8; 32]), "11111111111111111111111111111111");
        assert_eq!(
            decode_array::<32>("11111111111111111111111111111111", "k").unwrap(),
            [0u8; 32]
        );
    }

    #[test]
    fn wrong_lengths_and_alphabet_are_refused() {
        assert!(matches!(
            decode_array::<32>("111", "k"),
            Err(ProtoError::Length { got: 3, .. })
        ));
        assert!(matches!(
            decode_array::<32>("0OIl", "k"),
            Err(ProtoError::Base58 { .. })
        ));
        assert!(matches!(
            decode_vec("abc", "b", 2),
            Err(ProtoError::TooLarge { .. })
        ));
    }
}
