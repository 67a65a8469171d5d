//! base58 with the Bitcoin alphabet, no checksum (PROTOCOL.md §2.2), with the
//! length checks every decoder must make.
//!
//! Base conversion done digit by digit is quadratic in the length: the
//! byte-at-a-time loop of the usual implementations needs about 36 s to
//! decode 350,000 characters on a small server, which would let one sealed
//! request occupy a node for minutes. This codec works on machine words (ten
//! base-58 digits per 64-bit limb step when decoding, five per 32-bit step
//! when encoding) for short inputs, and splits long ones in halves joined by
//! a Karatsuba multiplication (value = high · base^k + low), which makes the
//! cost grow as n^1.6 rather than n². `benches/b58.rs` reports the cost at
//! the largest sizes the grid accepts; callers still cap the length before
//! decoding.

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
    let mut out = Vec::with_capacity(zeros + rest.len() * 138 / 100 + 10);
    out.resize(zeros, b'1');
    let mut digits: Vec<u8> = Vec::with_capacity(rest.len() * 138 / 100 + 10);
    if rest.len() <= LEAF_BYTES {
        for limb in bytes_to_b5(rest) {
            let mut l = limb;
            for _ in 0..5 {
                digits.push(ALPHABET[(l % 58) as usize]);
                l /= 58;
            }
        }
    } else {
        let powers = Powers::new(|| bytes_to_b10(&one_then_zeros(LEAF_BYTES)), mul::<B10>);
        for limb in bytes_to_b10_split(rest, &powers) {
            let mut l = limb;
            for _ in 0..10 {
                digits.push(ALPHABET[(l % 58) as usize]);
                l /= 58;
            }
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

/// Inputs up to this many bytes (encoding) or digits (decoding) are
/// converted limb by limb; longer ones are split in halves.
const LEAF_BYTES: usize = 512;
const LEAF_DIGITS: usize = 640;
/// Operands shorter than this many limbs are multiplied the schoolbook way.
const KARATSUBA_LIMBS: usize = 32;
/// 58^10, the radix of the limbs an encoding is built in (< 2^59).
const B10: u128 = 58u128.pow(10);
/// 2^64, the radix of the limbs a decoding is built in.
const B64: u128 = 1u128 << 64;

/// `1` followed by `n` zero bytes (digits): the value 256^n (58^n).
fn one_then_zeros(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n + 1];
    v[0] = 1;
    v
}

/// A big-endian byte string as little-endian limbs in base 58^5.
fn bytes_to_b5(rest: &[u8]) -> Vec<u32> {
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
    limbs
}

/// The same in base 58^10: pairs of base-58^5 limbs.
fn bytes_to_b10(rest: &[u8]) -> Vec<u64> {
    let b5 = bytes_to_b5(rest);
    let mut out: Vec<u64> = b5
        .chunks(2)
        .map(|p| u64::from(p[0]) + u64::from(p.get(1).copied().unwrap_or(0)) * B5)
        .collect();
    trim(&mut out);
    out
}

/// Base-58^10 limbs of `bytes`: high · 256^k + low, each half converted the
/// same way, with k = LEAF_BYTES · 2^j the largest below the length.
fn bytes_to_b10_split(bytes: &[u8], powers: &Powers) -> Vec<u64> {
    if bytes.len() <= LEAF_BYTES {
        return bytes_to_b10(bytes);
    }
    let j = split_level(bytes.len(), LEAF_BYTES);
    let k = LEAF_BYTES << j;
    let (high, low) = bytes.split_at(bytes.len() - k);
    let high = bytes_to_b10_split(high, powers);
    let low = bytes_to_b10_split(low, powers);
    let mut value = mul::<B10>(&high, &powers.get(j));
    add_into::<B10>(&mut value, &low, 0);
    trim(&mut value);
    value
}

/// The largest j with `leaf` · 2^j < `len` (`len` > `leaf`).
fn split_level(len: usize, leaf: usize) -> usize {
    let mut j = 0;
    while (leaf << (j + 1)) < len {
        j += 1;
    }
    j
}

/// base^(leaf · 2^j) for j = 0, 1, …, made by squaring as they are needed.
struct Powers {
    list: std::cell::RefCell<Vec<std::rc::Rc<Vec<u64>>>>,
    square: fn(&[u64], &[u64]) -> Vec<u64>,
}

impl Powers {
    fn new(first: impl FnOnce() -> Vec<u64>, square: fn(&[u64], &[u64]) -> Vec<u64>) -> Self {
        Powers {
            list: std::cell::RefCell::new(vec![std::rc::Rc::new(first())]),
            square,
        }
    }

    fn get(&self, j: usize) -> std::rc::Rc<Vec<u64>> {
        let mut list = self.list.borrow_mut();
        while list.len() <= j {
            let last = list[list.len() - 1].clone();
            list.push(std::rc::Rc::new((self.square)(&last, &last)));
        }
        list[j].clone()
    }
}

fn trim(v: &mut Vec<u64>) {
    while v.last() == Some(&0) {
        v.pop();
    }
}

/// `acc += x · R^shift` in radix `R`.
fn add_into<const R: u128>(acc: &mut Vec<u64>, x: &[u64], shift: usize) {
    if acc.len() < shift + x.len() {
        acc.resize(shift + x.len(), 0);
    }
    let mut carry = 0u128;
    let mut i = 0;
    while i < x.len() || carry != 0 {
        if shift + i == acc.len() {
            acc.push(0);
        }
        let s = u128::from(acc[shift + i]) + u128::from(x.get(i).copied().unwrap_or(0)) + carry;
        if s >= R {
            acc[shift + i] = (s - R) as u64;
            carry = 1;
        } else {
            acc[shift + i] = s as u64;
            carry = 0;
        }
        i += 1;
    }
}

/// `acc -= x` in radix `R`; `acc` ≥ `x`.
fn sub_into<const R: u128>(acc: &mut Vec<u64>, x: &[u64]) {
    let mut borrow = 0u128;
    let mut i = 0;
    while (i < x.len() || borrow != 0) && i < acc.len() {
        let a = u128::from(acc[i]);
        let b = u128::from(x.get(i).copied().unwrap_or(0)) + borrow;
        if a >= b {
            acc[i] = (a - b) as u64;
            borrow = 0;
        } else {
            acc[i] = (a + R - b) as u64;
            borrow = 1;
        }
        i += 1;
    }
    trim(acc);
}

/// Schoolbook product in radix `R`.
fn schoolbook<const R: u128>(a: &[u64], b: &[u64]) -> Vec<u64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let mut out = vec![0u64; a.len() + b.len()];
    if R == B64 {
        for (i, &x) in a.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &y) in b.iter().enumerate() {
                let t = u128::from(x) * u128::from(y) + u128::from(out[i + j]) + carry;
                out[i + j] = t as u64;
                carry = t >> 64;
            }
            out[i + b.len()] = carry as u64;
        }
    } else {
        // By columns: a column sums at most min(len) < KARATSUBA_LIMBS
        // products below R² < 2^118, well within a u128.
        let mut carry = 0u128;
        for (k, slot) in out.iter_mut().enumerate().take(a.len() + b.len() - 1) {
            let lo = k.saturating_sub(b.len() - 1);
            let hi = k.min(a.len() - 1);
            let mut acc = carry;
            for i in lo..=hi {
                acc += u128::from(a[i]) * u128::from(b[k - i]);
            }
            *slot = (acc % R) as u64;
            carry = acc / R;
        }
        // The product is below R^(len a + len b): the carry fits the top limb.
        out[a.len() + b.len() - 1] = carry as u64;
    }
    trim(&mut out);
    out
}

/// Karatsuba product in radix `R`.
fn mul<const R: u128>(a: &[u64], b: &[u64]) -> Vec<u64> {
    if a.len().min(b.len()) < KARATSUBA_LIMBS {
        // Keep the column sums small: the shorter operand bounds them.
        return schoolbook::<R>(a, b);
    }
    let m = a.len().max(b.len()) / 2;
    let (a0, a1) = a.split_at(m.min(a.len()));
    let (b0, b1) = b.split_at(m.min(b.len()));
    let z0 = mul::<R>(a0, b0);
    let z2 = mul::<R>(a1, b1);
    let mut sa = a0.to_vec();
    add_into::<R>(&mut sa, a1, 0);
    let mut sb = b0.to_vec();
    add_into::<R>(&mut sb, b1, 0);
    trim(&mut sa);
    trim(&mut sb);
    let mut z1 = mul::<R>(&sa, &sb);
    sub_into::<R>(&mut z1, &z0);
    sub_into::<R>(&mut z1, &z2);
    let mut out = z0;
    add_into::<R>(&mut out, &z1, m);
    add_into::<R>(&mut out, &z2, 2 * m);
    trim(&mut out);
    out
}

/// Base-58 digit values (most significant first) as little-endian 64-bit
/// limbs, ten digits per step.
fn digits_to_b64(digits: &[u8]) -> Vec<u64> {
    let mut limbs: Vec<u64> = Vec::with_capacity(digits.len() * 733 / 1000 / 8 + 2);
    for group in digits.chunks(10) {
        let mut value = 0u64;
        let mut mult = 1u64;
        for &d in group {
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
    trim(&mut limbs);
    limbs
}

/// The same, split in halves past LEAF_DIGITS: high · 58^k + low.
fn digits_to_b64_split(digits: &[u8], powers: &Powers) -> Vec<u64> {
    if digits.len() <= LEAF_DIGITS {
        return digits_to_b64(digits);
    }
    let j = split_level(digits.len(), LEAF_DIGITS);
    let k = LEAF_DIGITS << j;
    let (high, low) = digits.split_at(digits.len() - k);
    let high = digits_to_b64_split(high, powers);
    let low = digits_to_b64_split(low, powers);
    let mut value = mul::<B64>(&high, &powers.get(j));
    add_into::<B64>(&mut value, &low, 0);
    trim(&mut value);
    value
}

/// Decode any length; `None` for a character outside the alphabet.
fn decode_raw(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let zeros = b.iter().take_while(|&&c| c == b'1').count();
    let mut digits = Vec::with_capacity(b.len() - zeros);
    for &c in &b[zeros..] {
        let d = DECODE[c as usize];
        if d == 0xff {
            return None;
        }
        digits.push(d);
    }
    let limbs = if digits.len() <= LEAF_DIGITS {
        digits_to_b64(&digits)
    } else {
        let powers = Powers::new(|| digits_to_b64(&one_then_zeros(LEAF_DIGITS)), mul::<B64>);
        digits_to_b64_split(&digits, &powers)
    };
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

/// The most characters `bytes` bytes can encode to, without encoding (for
/// refusing an oversize blob before the work).
pub fn max_encoded_len(bytes: usize) -> usize {
    // log(256)/log(58) < 1.3658
    bytes.saturating_mul(13658).div_ceil(10000)
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
    fn long_edge_values_round_trip() {
        // All ones, inner zero runs, exact split sizes.
        for n in [511usize, 512, 513, 1024, 1025, 4096, 20_000] {
            for fill in [0xffu8, 0x01] {
                let mut v = vec![fill; n];
                v[n / 2..n / 2 + n / 4].fill(0);
                let s = encode(&v);
                assert_eq!(s, bs58::encode(&v).into_string(), "{n} {fill}");
                assert_eq!(decode_raw(&s).unwrap(), v, "{n} {fill}");
            }
        }
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
        fn long_inputs_agree_with_the_reference(bytes in proptest::collection::vec(any::<u8>(), 500..6000), zeros in 0usize..3) {
            // Past the leaf sizes: the split conversion, both ways.
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
