//! The network policy of the sandboxes.
//!
//! `None` gives every sandbox its own empty network namespace (only a
//! loopback device that reaches nothing outside). `Egress` would give it
//! outbound internet through `pasta`; see [`check`] for its state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{SandboxConfig, SandboxError};

/// What the code may reach on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkPolicy {
    /// No network at all: a fresh network namespace with nothing in it.
    #[default]
    None,
    /// Outbound internet only; never the host's loopback or private ranges.
    Egress,
}

impl NetworkPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkPolicy::None => "none",
            NetworkPolicy::Egress => "egress",
        }
    }
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(NetworkPolicy::None),
            "egress" => Ok(NetworkPolicy::Egress),
            other => Err(format!("unknown network policy {other:?} (none | egress)")),
        }
    }
}

/// Refuses a policy this build cannot enforce, so that a pool is never
/// started with less isolation than its configuration asks for.
pub(crate) fn check(cfg: &SandboxConfig) -> Result<(), SandboxError> {
    match cfg.network {
        NetworkPolicy::None => Ok(()),
        NetworkPolicy::Egress => Err(SandboxError::Setup(format!(
            "network policy egress is not available: the sandbox cannot yet keep {} from \
             reaching the host's loopback and private ranges",
            cfg.pasta.display()
        ))),
    }
}
