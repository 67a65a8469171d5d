//! What the grid offers and at what price (PROTOCOL.md §5.5, §5.8, §5.9,
//! §7b), one concern per module: the providers and models listings, the node
//! prices, the public attestation evidence, and the attestation policy.

use super::error::ClientError;
use super::state::Node;
use crate::proto::api::AttestationLevel;
use crate::proto::identity::NodeId;

pub mod earnings;
pub mod evidence;
pub mod owner;
pub mod policy;
pub mod prices;
pub mod providers;

/// The tee type clients see: the hardware's only when it was proven.
pub(super) fn shown_tee_type(n: &Node) -> String {
    match n.level {
        AttestationLevel::Hardware => n.tee_type.clone(),
        _ if n.tee_type == "sev-snp" || n.tee_type == "tdx" => "self_reported".into(),
        _ => n.tee_type.clone(),
    }
}

pub(super) fn node_or_404(id: &str) -> Result<NodeId, ClientError> {
    NodeId::parse(id).map_err(|_| ClientError::not_found("node_not_found", "no such node"))
}
