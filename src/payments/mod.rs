//! Payments and wallet auth: x402 (v1 and v2, exact EVM), MPP, the facilitator
//! client, credits, request signatures (EIP-191, Solana ed25519) and API keys.
//!
//! Money is integer micro-units everywhere; no floats on a money path.
