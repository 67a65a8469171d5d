//! EVM signatures: EIP-3009 `TransferWithAuthorization` over EIP-712 (the
//! x402 `exact` scheme and MPP `evm/charge`), and EIP-191 `personal_sign`
//! (X-Auth on Base). Hashing is alloy's (`alloy-sol-types` EIP-712,
//! `alloy-primitives` keccak and ecrecover); nothing here is hand-rolled.
//!
//! Signatures are 65 bytes `r ‖ s ‖ v`, `v` ∈ {27, 28} or {0, 1}. High-s
//! signatures (s > n/2) are refused: USDC's `ecrecover` wrapper reverts on
//! them, and accepting both encodings would let one authorization be shown
//! twice under different bytes. Smart-wallet signatures (EIP-1271/6492) need
//! a chain to check and are refused offline.

use std::str::FromStr;

use alloy_primitives::{eip191_hash_message, Address, Signature, B256, U256};
use alloy_sol_types::{sol, Eip712Domain, SolStruct};

use super::error::PaymentError;

sol! {
    /// EIP-3009 `TransferWithAuthorization`, as USDC signs it.
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// secp256k1 n / 2: the largest `s` a canonical (low-s) signature may carry.
const HALF_N: U256 = U256::from_limbs([
    0xdfe9_2f46_681b_20a0,
    0x5d57_6e73_57a4_501d,
    0xffff_ffff_ffff_ffff,
    0x7fff_ffff_ffff_ffff,
]);

/// The EIP-712 domain of an EIP-3009 token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDomain {
    pub name: String,
    pub version: String,
    pub chain_id: u64,
    pub verifying_contract: Address,
}

impl TokenDomain {
    fn eip712(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some(self.name.clone().into()),
            Some(self.version.clone().into()),
            Some(U256::from(self.chain_id)),
            Some(self.verifying_contract),
            None,
        )
    }
}

/// An EIP-3009 authorization, parsed from the wire strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: U256,
    pub valid_before: U256,
    pub nonce: B256,
}

impl Authorization {
    /// Parse the x402 wire form: addresses as 0x hex, integers as decimal
    /// strings, nonce as 0x + 64 hex.
    pub fn parse(
        from: &str,
        to: &str,
        value: &str,
        valid_after: &str,
        valid_before: &str,
        nonce: &str,
    ) -> Result<Self, PaymentError> {
        Ok(Authorization {
            from: parse_address(from)?,
            to: parse_address(to)?,
            value: parse_uint(value)?,
            valid_after: parse_uint(valid_after)?,
            valid_before: parse_uint(valid_before)?,
            nonce: parse_b256(nonce)?,
        })
    }

    /// The EIP-712 digest `keccak256(0x1901 ‖ domainSeparator ‖ structHash)`.
    pub fn signing_hash(&self, domain: &TokenDomain) -> B256 {
        let msg = TransferWithAuthorization {
            from: self.from,
            to: self.to,
            value: self.value,
            validAfter: self.valid_after,
            validBefore: self.valid_before,
            nonce: self.nonce,
        };
        msg.eip712_signing_hash(&domain.eip712())
    }

    /// Recover the signer of `signature` over this authorization.
    pub fn recover(&self, domain: &TokenDomain, signature: &str) -> Result<Address, PaymentError> {
        recover_prehash(&self.signing_hash(domain), signature)
    }

    /// Check the signature is `from`'s.
    pub fn verify(&self, domain: &TokenDomain, signature: &str) -> Result<(), PaymentError> {
        if self.recover(domain, signature)? != self.from {
            return Err(PaymentError::InvalidSignature);
        }
        Ok(())
    }
}

/// Parse a `0x`-prefixed 20-byte address (checksum not required; the
/// checksum is a typing aid, not a security property).
pub fn parse_address(s: &str) -> Result<Address, PaymentError> {
    let hex = s
        .strip_prefix("0x")
        .ok_or(PaymentError::InvalidPayload("address"))?;
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PaymentError::InvalidPayload("address"));
    }
    Address::from_str(s).map_err(|_| PaymentError::InvalidPayload("address"))
}

/// Parse a decimal uint256 (no sign, no leading `+`, at most 78 digits).
fn parse_uint(s: &str) -> Result<U256, PaymentError> {
    if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PaymentError::InvalidPayload("integer"));
    }
    U256::from_str_radix(s, 10).map_err(|_| PaymentError::InvalidPayload("integer"))
}

fn parse_b256(s: &str) -> Result<B256, PaymentError> {
    let hex = s
        .strip_prefix("0x")
        .ok_or(PaymentError::InvalidPayload("nonce"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PaymentError::InvalidPayload("nonce"));
    }
    B256::from_str(s).map_err(|_| PaymentError::InvalidPayload("nonce"))
}

/// Parse a 65-byte `r ‖ s ‖ v` hex signature, refusing high-s.
fn parse_signature(s: &str) -> Result<Signature, PaymentError> {
    let hex_str = s.strip_prefix("0x").unwrap_or(s);
    if hex_str.len() != 130 {
        return Err(PaymentError::InvalidSignature);
    }
    let bytes = hex::decode(hex_str).map_err(|_| PaymentError::InvalidSignature)?;
    let r = U256::from_be_slice(&bytes[0..32]);
    let s_val = U256::from_be_slice(&bytes[32..64]);
    let parity = match bytes[64] {
        0 | 27 => false,
        1 | 28 => true,
        _ => return Err(PaymentError::InvalidSignature),
    };
    if r.is_zero() || s_val.is_zero() {
        return Err(PaymentError::InvalidSignature);
    }
    if s_val > HALF_N {
        return Err(PaymentError::HighS);
    }
    Ok(Signature::new(r, s_val, parity))
}

/// ecrecover over a 32-byte digest.
fn recover_prehash(digest: &B256, signature: &str) -> Result<Address, PaymentError> {
    let sig = parse_signature(signature)?;
    sig.recover_address_from_prehash(digest)
        .map_err(|_| PaymentError::InvalidSignature)
}

/// Recover the EIP-191 `personal_sign` signer of `message`.
pub fn recover_personal(message: &[u8], signature: &str) -> Result<Address, PaymentError> {
    recover_prehash(&eip191_hash_message(message), signature)
}

/// Lowercase `0x…` form of an address (the form the store and X-Auth use).
pub fn lower(addr: &Address) -> String {
    format!("{addr:#x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_n_is_n_over_two() {
        let n = U256::from_str_radix(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
            16,
        )
        .unwrap();
        assert_eq!(HALF_N, n >> 1);
    }

    #[test]
    fn lower_is_lowercase_hex() {
        let a = parse_address("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266").unwrap();
        assert_eq!(lower(&a), "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266");
    }
}
