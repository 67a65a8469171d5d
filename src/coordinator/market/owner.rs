//! Who may act for a node on the client API (node prices, earnings): the
//! node itself, by its token in `X-Node-Auth`, or its owner, by an X-Auth
//! wallet signature (the X402-COMPUTE-AUTH v1 message, nonce consumed)
//! whose address is the node's `wallet_address`.

use axum::http::{HeaderMap, Method, StatusCode, Uri};

use crate::coordinator::error::ClientError;
use crate::coordinator::state::Grid;
use crate::proto::identity::NodeId;
use crate::store::WalletId;

/// Who was let in.
pub enum NodeAuth {
    /// The node's token.
    Node,
    /// The wallet whose signature was verified.
    Owner(WalletId),
}

fn unauthorized() -> ClientError {
    ClientError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "unauthorized",
        "X-Node-Auth does not hold this node's token",
    )
}

fn signature_refused(e: &crate::payments::PaymentError) -> ClientError {
    ClientError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        match e {
            crate::payments::PaymentError::AuthExpired => "signature_expired",
            crate::payments::PaymentError::AuthNonceUsed => "nonce_reused",
            _ => "invalid_signature",
        },
        e.to_string(),
    )
}

/// Same wallet: `0x…` addresses compare case-insensitively, others exactly.
fn same_wallet(a: &str, b: &str) -> bool {
    if a.starts_with("0x") || a.starts_with("0X") {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// Let in the node (`X-Node-Auth`) or its owner wallet (`X-Auth-*` over
/// this request); 401 for a missing or bad credential, 403
/// `not_node_owner` for a valid signature by another wallet, 404 for an
/// unknown node reached by signature. Unknown nodes and bad tokens look
/// alike (401).
pub async fn authorize(
    grid: &Grid,
    node_id: &NodeId,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<NodeAuth, ClientError> {
    if let Some(token) = headers.get(crate::proto::headers::NODE_AUTH) {
        let token = token.to_str().map_err(|_| unauthorized())?;
        let inner = grid.lock();
        return if grid.authenticate(&inner, node_id, token) {
            Ok(NodeAuth::Node)
        } else {
            Err(unauthorized())
        };
    }
    if !headers.contains_key(crate::proto::headers::AUTH_SIGNATURE)
        && !headers.contains_key(crate::proto::headers::AUTH_ADDRESS)
    {
        return Err(unauthorized());
    }
    let Some(payments) = grid.payments.as_ref() else {
        return Err(ClientError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthorized",
            "wallet signatures need a coordinator with payments enabled; use X-Node-Auth",
        ));
    };
    let parts = crate::payments::RequestParts {
        method,
        uri,
        headers,
        body,
    };
    let wallet = payments
        .signed_wallet(&parts)
        .await
        .map_err(|e| signature_refused(&e))?;
    let inner = grid.lock();
    let n = inner
        .node(node_id)
        .ok_or_else(|| ClientError::not_found("node_not_found", "no such node"))?;
    if n.wallet_address.is_empty() || !same_wallet(&n.wallet_address, wallet.as_str()) {
        return Err(ClientError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "not_node_owner",
            "the signing wallet is not this node's wallet_address",
        ));
    }
    Ok(NodeAuth::Owner(wallet))
}
