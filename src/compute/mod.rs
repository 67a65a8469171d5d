//! The compute plane: the Machines API (plans, regions, images, lifecycle) over
//! provider adapters (Vultr, DigitalOcean).
//!
//! - [`provider`]: the [`Provider`](provider::Provider) trait and the HTTP
//!   plumbing (error bodies, 429 backoff); [`vultr`] and [`digitalocean`]
//!   are the two clients.
//! - [`catalogue`]: the merged, cached catalogue at our prices.
//! - [`service`]: [`Machines`], the lifecycle: orders written before the
//!   provider is called, polling until active, the expiry reaper and the
//!   reconciliation of orders a stopped coordinator left in flight.
//! - [`http`]: the `/compute/…` routes, on the same [`Payments`] (store,
//!   keys, credits) as `/compute/api-keys` and `/compute/credits/*`.
//! - [`seal`]: root passwords sealed at rest until read once.
//! - [`exec`]: pay-per-request code execution in bubblewrap sandboxes.
//! - [`discovery`]: `GET /.well-known/x402`, the paid resources served here.
//!
//! [`Payments`]: crate::payments::Payments

pub mod catalogue;
pub mod digitalocean;
pub mod discovery;
pub mod exec;
pub mod http;
pub mod provider;
pub mod seal;
pub mod service;
pub mod vultr;

pub use service::{Machines, MachinesConfig};
