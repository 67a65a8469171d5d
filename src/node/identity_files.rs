//! The node's identity files (PROTOCOL.md §2.1): `keypair.json` and
//! `node.json` in the config directory, with the permissions the protocol asks
//! for: the directory 0700, the files 0600, loose permissions tightened before
//! anything is read, and a refusal when they cannot be.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::private_file::{self, PrivateFileError, DIR_MODE, FILE_MODE};
use crate::proto::identity::{NodeId, NodeIdentity, KEY_VERSION};
use crate::proto::ProtoError;

pub const KEYPAIR_FILE: &str = "keypair.json";
pub const NODE_FILE: &str = "node.json";

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("a node identity already exists at {0} (use --force to replace it; the old identity is lost)")]
    Exists(PathBuf),
    #[error("no node identity at {0} (run `sgl node init` first)")]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] PrivateFileError),
    #[error("{path}: {source}")]
    Keypair { path: PathBuf, source: ProtoError },
    #[error("{path}: invalid node.json: {source}")]
    NodeJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("coordinator URL {0:?} must be https:// (plain http is allowed only for localhost, 127.0.0.1 and ::1)")]
    InsecureUrl(String),
    #[error("no config directory: set HOME or pass --config-dir")]
    NoConfigDir,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `node.json`: the node's registration state, pretty-printed (§2.1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFile {
    /// Assigned by the coordinator at registration.
    pub node_id: Option<String>,
    /// The node's bearer token; rotated by the coordinator (§6.5).
    pub auth_token: Option<String>,
    pub wallet_address: Option<String>,
    pub tee_type: String,
    pub orchestrator_url: String,
    pub keypair_path: String,
}

/// The default config directory: `<platform config dir>/sgl-node`
/// (`~/.config/sgl-node` on Linux).
pub fn default_config_dir() -> Result<PathBuf, IdentityError> {
    dirs::config_dir()
        .map(|d| d.join("sgl-node"))
        .ok_or(IdentityError::NoConfigDir)
}

/// The node refuses a coordinator that is not https, except on loopback (§1.2).
pub fn check_coordinator_url(url: &str) -> Result<(), IdentityError> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            authority.rsplit_once(':').map_or(authority, |(h, _)| h)
        };
        if matches!(host, "localhost" | "127.0.0.1" | "::1") {
            return Ok(());
        }
    }
    Err(IdentityError::InsecureUrl(url.to_string()))
}

/// What `sgl node init` is asked to write.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub force: bool,
    pub wallet_address: Option<String>,
    pub tee_type: String,
    pub coordinator_url: String,
}

/// Create the config directory (0700), a fresh identity in `keypair.json`
/// (0600) and `node.json` (0600). Refuses to replace an identity unless forced.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<NodeIdentity, IdentityError> {
    check_coordinator_url(&opts.coordinator_url)?;
    let keypair_path = dir.join(KEYPAIR_FILE);
    if keypair_path.exists() && !opts.force {
        return Err(IdentityError::Exists(keypair_path));
    }
    private_file::create_dir(dir)?;
    let identity = NodeIdentity::generate();
    private_file::write(&keypair_path, identity.to_keypair_json().as_bytes())?;
    let node = NodeFile {
        node_id: None,
        auth_token: None,
        wallet_address: opts.wallet_address.clone(),
        tee_type: opts.tee_type.clone(),
        orchestrator_url: opts.coordinator_url.clone(),
        keypair_path: keypair_path.display().to_string(),
    };
    save_node_file(dir, &node)?;
    Ok(identity)
}

/// Load the identity, tightening permissions first.
pub fn load_identity(dir: &Path) -> Result<NodeIdentity, IdentityError> {
    let path = dir.join(KEYPAIR_FILE);
    if !path.exists() {
        return Err(IdentityError::Missing(path));
    }
    private_file::tighten(dir, DIR_MODE)?;
    private_file::tighten(&path, FILE_MODE)?;
    let text = zeroize::Zeroizing::new(fs::read_to_string(&path).map_err(io_err(&path))?);
    NodeIdentity::from_keypair_json(&text).map_err(|source| IdentityError::Keypair { path, source })
}

pub fn load_node_file(dir: &Path) -> Result<NodeFile, IdentityError> {
    let path = dir.join(NODE_FILE);
    if !path.exists() {
        return Err(IdentityError::Missing(path));
    }
    private_file::tighten(&path, FILE_MODE)?;
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|source| IdentityError::NodeJson { path, source })
}

/// Save `node.json` (0600, atomic). The node switches to a rotated token only
/// after this returns Ok (§6.5).
pub fn save_node_file(dir: &Path, node: &NodeFile) -> Result<(), IdentityError> {
    let path = dir.join(NODE_FILE);
    let text = serde_json::to_string_pretty(node).map_err(|source| IdentityError::NodeJson {
        path: path.clone(),
        source,
    })?;
    Ok(private_file::write(&path, text.as_bytes())?)
}

/// The public facts `sgl node init` and `sgl node keys` print.
#[derive(Debug, Clone, Serialize)]
pub struct PublicKeys {
    pub ed25519_public_key: String,
    pub ed25519_public_key_hex: String,
    pub x25519_public_key: String,
    pub key_version: u32,
    pub node_id: Option<String>,
    /// The keybind signature (§2.4), once a node id is assigned.
    pub keybind_signature: Option<String>,
    pub config_dir: String,
}

pub fn public_keys(dir: &Path, identity: &NodeIdentity, node: Option<&NodeFile>) -> PublicKeys {
    let node_id = node.and_then(|n| n.node_id.clone());
    let keybind_signature = node_id
        .as_deref()
        .and_then(|id| NodeId::parse(id).ok())
        .map(|id| identity.sign_keybind(&id, KEY_VERSION).to_b58());
    PublicKeys {
        ed25519_public_key: identity.ed25519_public().to_b58(),
        ed25519_public_key_hex: hex::encode(identity.ed25519_public().as_bytes()),
        x25519_public_key: identity.x25519_public().to_b58(),
        key_version: KEY_VERSION,
        node_id,
        keybind_signature,
        config_dir: dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls() {
        for ok in [
            "https://grid.example",
            "http://localhost:8080",
            "http://127.0.0.1/x",
            "http://[::1]:9/",
        ] {
            check_coordinator_url(ok).unwrap();
        }
        for bad in [
            "http://grid.example",
            "http://localhost.evil.com",
            "ftp://x",
            "http://127.0.0.2",
            "ws://localhost",
        ] {
            assert!(check_coordinator_url(bad).is_err(), "{bad}");
        }
    }
}
