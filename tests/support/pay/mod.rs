//! Helpers shared by the payments and store tests.
#![allow(dead_code)]

#[cfg(feature = "payments")]
pub mod facilitator;
#[cfg(feature = "payments")]
pub mod server;
#[cfg(feature = "payments")]
pub mod signing;
pub mod stores;
