//! TEE evidence: sources (SEV-SNP, TDX, simulated) behind one trait, and the
//! verifier (certificate chain, policy, report_data binding).
//!
//! Owns: evidence collection and verification. May not touch: HTTP, the engine.
