//! The payments error type. Payment refusals carry the x402 error code of
//! the x402 specification (`invalidReason` / `errorReason` strings), so a
//! client sees the same reason a facilitator would give.

use crate::money::Micros;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("malformed payment: {0}")]
    InvalidPayload(&'static str),
    #[error("unsupported x402 version")]
    InvalidVersion,
    #[error("unsupported payment scheme")]
    UnsupportedScheme,
    #[error("payment is for another network or asset")]
    NetworkMismatch,
    #[error("payment does not match what this resource asks for: {0}")]
    RequirementsMismatch(&'static str),
    #[error("signature does not recover to the payer")]
    InvalidSignature,
    #[error("high-s signature refused")]
    HighS,
    #[error("authorization pays another recipient")]
    RecipientMismatch,
    #[error("authorization amount differs from the price")]
    ValueMismatch,
    #[error("authorization amount is below the price")]
    ValueTooLow,
    #[error("authorization is not valid yet")]
    NotYetValid,
    #[error("authorization expires too soon or has expired")]
    Expired,
    #[error("this authorization was already used")]
    NonceUsed,
    #[error("the facilitator refused the payment: {reason}")]
    FacilitatorRefused { reason: String },
    #[error("the facilitator failed: {0}")]
    FacilitatorUnavailable(String),
    #[error("MPP credential malformed: {0}")]
    MppMalformed(&'static str),
    #[error("MPP challenge unknown or altered")]
    MppChallengeInvalid,
    #[error("MPP challenge expired")]
    MppChallengeExpired,
    #[error("MPP challenge already used")]
    MppChallengeUsed,
    #[error("MPP authorization nonce does not bind the challenge")]
    MppNonceNotBound,
    #[error("authentication required")]
    AuthMissing,
    #[error("invalid request signature: {0}")]
    AuthInvalid(&'static str),
    #[error("request signature timestamp outside the allowed window")]
    AuthExpired,
    #[error("request signature nonce already used")]
    AuthNonceUsed,
    #[error("invalid or revoked API key")]
    ApiKeyInvalid,
    #[error("X-API-Key and Authorization carry different keys")]
    ApiKeyConflict,
    #[error("insufficient credits: balance {balance}, needed {needed}")]
    InsufficientCredits { balance: Micros, needed: Micros },
    #[error("the payment comes from another wallet than the authenticated one")]
    PayerMismatch,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("not found")]
    NotFound,
    #[error("storage failure: {0}")]
    Store(StoreError),
}

impl From<StoreError> for PaymentError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InsufficientCredits { balance, needed } => {
                PaymentError::InsufficientCredits { balance, needed }
            }
            other => PaymentError::Store(other),
        }
    }
}

impl PaymentError {
    /// The machine-readable reason: the x402 specification's name where it
    /// has one, else an `sgl` name in the same style.
    pub fn code(&self) -> &str {
        match self {
            PaymentError::InvalidPayload(_) => "invalid_payload",
            PaymentError::InvalidVersion => "invalid_x402_version",
            PaymentError::UnsupportedScheme => "unsupported_scheme",
            PaymentError::NetworkMismatch => "invalid_network",
            PaymentError::RequirementsMismatch(_) => "invalid_payment_requirements",
            PaymentError::InvalidSignature | PaymentError::HighS => {
                "invalid_exact_evm_payload_signature"
            }
            PaymentError::RecipientMismatch => "invalid_exact_evm_payload_recipient_mismatch",
            PaymentError::ValueMismatch => "invalid_exact_evm_payload_authorization_value_mismatch",
            PaymentError::ValueTooLow => "invalid_exact_evm_payload_authorization_value",
            PaymentError::NotYetValid => "invalid_exact_evm_payload_authorization_valid_after",
            PaymentError::Expired => "invalid_exact_evm_payload_authorization_valid_before",
            PaymentError::NonceUsed => "invalid_exact_evm_nonce_already_used",
            PaymentError::FacilitatorRefused { reason } => reason.as_str(),
            PaymentError::FacilitatorUnavailable(_) => "unexpected_settle_error",
            PaymentError::MppMalformed(_) => "malformed-credential",
            PaymentError::MppChallengeInvalid => "invalid-challenge",
            PaymentError::MppChallengeExpired => "payment-expired",
            PaymentError::MppChallengeUsed => "credential-replayed",
            PaymentError::MppNonceNotBound => "verification-failed",
            PaymentError::AuthMissing => "auth_required",
            PaymentError::AuthInvalid(_) => "invalid_signature",
            PaymentError::AuthExpired => "signature_expired",
            PaymentError::AuthNonceUsed => "nonce_reused",
            PaymentError::ApiKeyInvalid => "invalid_api_key",
            PaymentError::ApiKeyConflict => "conflicting_api_keys",
            PaymentError::InsufficientCredits { .. } => "insufficient_credits",
            PaymentError::PayerMismatch => "payer_mismatch",
            PaymentError::BadRequest(_) => "invalid_request",
            PaymentError::NotFound => "not_found",
            PaymentError::Store(_) => "internal_error",
        }
    }

    /// True for refusals of a presented payment (answered with a fresh 402
    /// challenge), as opposed to auth, request or server failures.
    pub fn is_payment_refusal(&self) -> bool {
        matches!(
            self,
            PaymentError::InvalidPayload(_)
                | PaymentError::InvalidVersion
                | PaymentError::UnsupportedScheme
                | PaymentError::NetworkMismatch
                | PaymentError::RequirementsMismatch(_)
                | PaymentError::InvalidSignature
                | PaymentError::HighS
                | PaymentError::RecipientMismatch
                | PaymentError::ValueMismatch
                | PaymentError::ValueTooLow
                | PaymentError::NotYetValid
                | PaymentError::Expired
                | PaymentError::NonceUsed
                | PaymentError::FacilitatorRefused { .. }
                | PaymentError::MppMalformed(_)
                | PaymentError::MppChallengeInvalid
                | PaymentError::MppChallengeExpired
                | PaymentError::MppChallengeUsed
                | PaymentError::MppNonceNotBound
                | PaymentError::InsufficientCredits { .. }
        )
    }

    /// True for MPP credential failures (answered as RFC 9457 problems).
    pub fn is_mpp(&self) -> bool {
        matches!(
            self,
            PaymentError::MppMalformed(_)
                | PaymentError::MppChallengeInvalid
                | PaymentError::MppChallengeExpired
                | PaymentError::MppChallengeUsed
                | PaymentError::MppNonceNotBound
        )
    }
}
