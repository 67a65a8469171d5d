//! Payments and wallet auth: x402 (v1 and v2, scheme `exact` on EVM), MPP
//! (`Payment` HTTP auth, `evm/charge`), the x402 facilitator client, credits,
//! request signatures (EVM EIP-191, Solana ed25519) and API keys; and the
//! payer's side of x402 and X-Auth ([`wallet`]) for `sgl chat`.
//!
//! Owns: verifying what a client presents (payments, signatures, keys),
//! settling payments through the facilitator, the credits position of each
//! wallet (through [`crate::store`]), and the one billing path of metered
//! work ([`billing`]: hold → settle at the metered cost → or release). Does
//! not own routing, pricing or jobs: the coordinator and the compute plane
//! decide what a request costs and call the gate API of
//! [`service::Payments`]; [`http::router`] serves the key and credits
//! endpoints both of them mount.
//!
//! Money is integer micro-USD ([`crate::money::Micros`]) everywhere; no
//! floats on a money path. Payments fail closed: anything unverifiable is
//! refused, and a refused or failed payment consumes nothing.

pub mod apikey;
pub mod billing;
pub mod config;
pub mod error;
pub mod evm;
pub mod facilitator;
pub mod http;
pub mod mpp;
pub mod reservations;
pub mod service;
pub mod wallet;
pub mod x402;
pub mod xauth;

pub use billing::{Charge, ChargeRefused, Receipt};
pub use config::{EvmNetwork, MppConfig, PaymentsConfig};
pub use error::PaymentError;
pub use service::{Payer, PaymentMethod, Payments, PendingPayment, RequestParts, Settlement};
pub use x402::Offer;
