//! Payments configuration: what is accepted (networks, assets, payee), where
//! the facilitator is, and the MPP realm and secret. Production defaults are
//! Base USDC; every value is configuration so tests point at loopback.

use std::time::Duration;

use alloy_primitives::{address, Address};
use zeroize::Zeroizing;

use super::evm::TokenDomain;
use super::facilitator::FacilitatorAuth;
use crate::money::Micros;

/// An EVM network and the EIP-3009 token accepted on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvmNetwork {
    /// The x402 v1 network name (`base`, `base-sepolia`).
    pub v1_name: String,
    pub chain_id: u64,
    /// The token contract (EIP-712 `verifyingContract`).
    pub asset: Address,
    /// EIP-712 domain name and version of the token (`USD Coin`, `2`).
    pub asset_name: String,
    pub asset_version: String,
}

impl EvmNetwork {
    /// USDC on Base mainnet.
    pub fn base_usdc() -> Self {
        EvmNetwork {
            v1_name: "base".into(),
            chain_id: 8453,
            asset: address!("833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
            asset_name: "USD Coin".into(),
            asset_version: "2".into(),
        }
    }

    /// USDC on Base Sepolia (testnet).
    pub fn base_sepolia_usdc() -> Self {
        EvmNetwork {
            v1_name: "base-sepolia".into(),
            chain_id: 84532,
            asset: address!("036CbD53842c5426634e7929541eC2318f3dCF7e"),
            asset_name: "USDC".into(),
            asset_version: "2".into(),
        }
    }

    /// The CAIP-2 id x402 v2 uses (`eip155:8453`).
    pub fn caip2(&self) -> String {
        format!("eip155:{}", self.chain_id)
    }

    pub fn domain(&self) -> TokenDomain {
        TokenDomain {
            name: self.asset_name.clone(),
            version: self.asset_version.clone(),
            chain_id: self.chain_id,
            verifying_contract: self.asset,
        }
    }
}

/// MPP (`Payment` HTTP auth) settings. The challenges offer method `evm`,
/// intent `charge`, credential type `authorization` (an EIP-3009
/// authorization of the first configured network's token): what the
/// official clients (`pympp`, `mppx`) pay with.
#[derive(Clone)]
pub struct MppConfig {
    /// The protection space named in challenges (usually the public host).
    pub realm: String,
    /// HMAC key binding challenge ids to their parameters.
    pub secret: Zeroizing<Vec<u8>>,
    /// How long a challenge stays valid.
    pub validity: Duration,
    /// Who MPP payments go to; None: `PaymentsConfig::pay_to`.
    pub recipient: Option<Address>,
}

impl MppConfig {
    /// The shortest HMAC secret accepted.
    pub const MIN_SECRET_BYTES: usize = 32;

    /// MPP in `realm` with challenges bound by `secret`, valid five minutes,
    /// paying `PaymentsConfig::pay_to`.
    pub fn new(realm: impl Into<String>, secret: Zeroizing<Vec<u8>>) -> Self {
        MppConfig {
            realm: realm.into(),
            secret,
            validity: Duration::from_secs(300),
            recipient: None,
        }
    }

    /// Whether `realm` can be sent as a quoted parameter of
    /// `WWW-Authenticate` as is: printable ASCII without `"` or `\`.
    pub fn valid_realm(realm: &str) -> bool {
        !realm.is_empty()
            && realm.len() <= 256
            && realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    }
}

impl std::fmt::Debug for MppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MppConfig")
            .field("realm", &self.realm)
            .field("secret", &"<redacted>")
            .field("validity", &self.validity)
            .field("recipient", &self.recipient)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct PaymentsConfig {
    /// Accepted networks; offered in this order in `accepts[]`; MPP uses
    /// the first.
    pub networks: Vec<EvmNetwork>,
    /// Who gets paid.
    pub pay_to: Address,
    /// x402 facilitator base URL (`POST /verify`, `POST /settle`,
    /// `GET /supported` below it).
    pub facilitator_url: String,
    /// The credentials the facilitator wants (a bearer token, a CDP key).
    pub facilitator_auth: FacilitatorAuth,
    /// Public base URL (`https://grid.example.com`) used to build the
    /// resource URL of a challenge. None: `http://` + the request's Host.
    pub public_base_url: Option<String>,
    /// `maxTimeoutSeconds` offered in challenges.
    pub max_timeout_seconds: u64,
    /// MPP, when configured.
    pub mpp: Option<MppConfig>,
    /// X-Auth timestamps are accepted within ± this window.
    pub auth_window: Duration,
    /// Smallest credits top-up.
    pub min_topup: Micros,
    /// Largest credits top-up (a guard against typos, not a limit of the
    /// protocol).
    pub max_topup: Micros,
}

impl PaymentsConfig {
    /// Base USDC, paying `pay_to`, settling through `facilitator_url`.
    pub fn new(pay_to: Address, facilitator_url: impl Into<String>) -> Self {
        PaymentsConfig {
            networks: vec![EvmNetwork::base_usdc()],
            pay_to,
            facilitator_url: facilitator_url.into(),
            facilitator_auth: FacilitatorAuth::None,
            public_base_url: None,
            max_timeout_seconds: 300,
            mpp: None,
            auth_window: Duration::from_secs(300),
            min_topup: Micros::USD,
            max_topup: Micros(100_000 * 1_000_000),
        }
    }

    /// Who MPP payments go to.
    pub fn mpp_recipient(&self) -> Address {
        self.mpp
            .as_ref()
            .and_then(|m| m.recipient)
            .unwrap_or(self.pay_to)
    }
}
