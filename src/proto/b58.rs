//! base58 with the Bitcoin alphabet, no checksum (PROTOCOL.md §2.2), with the
//! length checks every decoder must make.
//!
//! Base conversion is quadratic in the length. The byte-at-a-time loop of the
//! usual implementations needs about 36 s to decode 350,000 characters on a
//! small server, which would let one sealed request occupy a node for minutes.
//! This codec works on machine words (ten base-58 digits per 64-bit limb step
//! when decoding, five per 32-bit step when encoding), about fifty times
//! faster, and callers still cap the length before decoding.

use super::ProtoError;

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// ASCII → digit value, 0xff for characters outside the alphabet.
const DECODE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 58 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// 58^5, the base of the limbs used when encoding (< 2^30).
const B5: u64 = 58u64.pow(5);

pub fn encode(bytes: &[u8]) -> String {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    let rest = &bytes[zeros..];
    // Little-endian limbs in base 58^5.
    let mut limbs: Vec<u32> = Vec::with_capacity(rest.len() * 138 / 100 / 5 + 2);
    for group in rest.chunks(4) {
        let shift = 8 * group.len() as u32;
        let mut carry = group.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        for limb in limbs.iter_mut() {
            // limb < 2^30, so (limb << 32) + carry < 2^63.
            let acc = (u64::from(*limb) << shift) + carry;
            *limb = (acc % B5) as u32;
            carry = acc / B5;
        }
        while carry > 0 {
            limbs.push((carry % B5) as u32);
            carry /= B5;
        }
    }
    let mut out = Vec::with_capacity(zeros + limbs.len() * 5);
    out.resize(zeros, b'1');
    let mut digits = Vec::with_capacity(limbs.len() * 5);
    for &limb in &limbs {
        let mut l = limb;
        for _ in 0..5 {
            digits.push(ALPHABET[(l % 58) as usize]);
            l /= 58;
        }
    }
    // The most significant limb may carry leading zero digits ('1'): drop them.
    while digits.last() == Some(&b'1') {
        digits.pop();
    }
    out.extend(digits.iter().rev());
    // Every byte pushed is from ALPHABET, which is ASCII.
    String::from_utf8(out).unwrap_or_default()
}

/// Decode any length; `None` for a character outside the alphabet.
fn decode_raw(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let zeros = b.iter().take_while(|&&c| c == b'1').count();
    // Little-endian 64-bit limbs.
    let mut limbs: Vec<u64> = Vec::with_capacity((b.len() - zeros) * 733 / 1000 / 8 + 2);
    for group in b[zeros..].chunks(10) {
        let mut value = 0u64;
        let mut mult = 1u64;
        for &c in group {
            let d = DECODE[c as usize];
            if d == 0xff {
                return None;
            }
            value = value * 58 + u64::from(d);
            mult *= 58;
        }
        let mut carry = u128::from(value);
        for limb in limbs.iter_mut() {
            let acc = u128::from(*limb) * u128::from(mult) + carry;
            *limb = acc as u64;
            carry = acc >> 64;
        }
        // carry < mult ≤ 58^10 < 2^64.
        if carry > 0 {
            limbs.push(carry as u64);
        }
    }
    let mut out = vec![0u8; zeros];
    let mut significant = false;
    for limb in limbs.iter().rev() {
        for byte in limb.to_be_bytes() {
            if significant || byte != 0 {
                significant = true;
                out.push(byte);
            }
        }
    }
    Some(out)
}

/// Decode exactly `N` bytes (keys: 32, signatures: 64).
pub fn decode_array<const N: usize>(s: &str, what: &'static str) -> Result<[u8; N], ProtoError> {
    // N bytes are at most ~1.37 N characters; anything far longer is not worth decoding.
    if s.len() > 2 * N + 8 {
        return Err(ProtoError::TooLarge {
            what,
            max: 2 * N + 8,
            got: s.len(),
        });
    }
    let v = decode_raw(s).ok_or(ProtoError::Base58 { what })?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| ProtoError::Length {
        what,
        expected: N,
        got: v.len(),
    })
}

/// Decode a blob, with the character cap checked first.
pub fn decode_vec(s: &str, what: &'static str, max_chars: usize) -> Result<Vec<u8>, ProtoError> {
    if s.len() > max_chars {
        return Err(ProtoError::TooLarge {
            what,
            max: max_chars,
            got: s.len(),
        });
    }
    decode_raw(s).ok_or(ProtoError::Base58 { what })
}

/// The largest number of bytes `chars` base-58 characters can decode to,
/// without decoding (for quoting a price on a sealed prompt).
pub fn max_decoded_len(chars: usize) -> usize {
    // log(58)/log(256) < 0.7323
    chars.saturating_mul(7323).div_ceil(10000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_key_is_all_ones() {
        assert_eq!(encode(&[0u8; 32]), "11111111111111111111111111111111");
        assert_eq!(
            decode_array::<32>("11111111111111111111111111111111", "k").unwrap(),
            [0u8; 32]
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(decode_raw("").unwrap(), Vec::<u8>::new());
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
        assert!(matches!(
            decode_vec("ab\u{e9}", "b", 10),
            Err(ProtoError::Base58 { .. })
        ));
    }

    #[test]
    fn max_decoded_len_is_an_upper_bound() {
        for n in [0usize, 1, 2, 31, 32, 64, 136, 1000] {
            let bytes = vec![0xffu8; n];
            let s = encode(&bytes);
            assert!(max_decoded_len(s.len()) >= n, "{n}");
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_codec(bytes in proptest::collection::vec(any::<u8>(), 0..300), zeros in 0usize..4) {
            let mut input = vec![0u8; zeros];
            input.extend(bytes);
            let ours = encode(&input);
            prop_assert_eq!(&ours, &bs58::encode(&input).into_string());
            prop_assert_eq!(decode_raw(&ours).unwrap(), input);
        }

        #[test]
        fn decodes_like_the_reference(s in "[1-9A-HJ-NP-Za-km-z]{0,200}") {
            prop_assert_eq!(decode_raw(&s).unwrap(), bs58::decode(&s).into_vec().unwrap());
        }
    }
}
