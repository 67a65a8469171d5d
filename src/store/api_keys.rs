//! API keys: only a key's SHA-256 and its last four characters are stored.

use super::{Result, Store, StoreError, WalletId};

/// A stored API key (never the key itself: only its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub wallet: WalletId,
    pub label: String,
    pub key_hash: [u8; 32],
    pub key_last4: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

type KeyRow = (String, String, String, Vec<u8>, String, i64, Option<i64>);

fn key_from_row(r: KeyRow) -> Result<ApiKeyRecord> {
    let (id, wallet, label, hash, last4, created, revoked) = r;
    let key_hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt("api key hash length"))?;
    Ok(ApiKeyRecord {
        id,
        wallet: WalletId(wallet),
        label,
        key_hash,
        key_last4: last4,
        created_at_ms: created,
        revoked_at_ms: revoked,
    })
}

impl Store {
    /// Store a new API key's hash.
    pub async fn insert_api_key(
        &self,
        wallet: &WalletId,
        label: &str,
        key_hash: &[u8; 32],
        key_last4: &str,
    ) -> Result<ApiKeyRecord> {
        let id = uuid::Uuid::new_v4().to_string();
        let now = self.now_ms();
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, wallet, label, key_hash, key_last4, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(wallet.as_str())
            .bind(label)
            .bind(&key_hash[..])
            .bind(key_last4)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(ApiKeyRecord {
            id,
            wallet: wallet.clone(),
            label: label.to_owned(),
            key_hash: *key_hash,
            key_last4: key_last4.to_owned(),
            created_at_ms: now,
            revoked_at_ms: None,
        })
    }

    /// The wallet's keys (revoked ones included), oldest first.
    pub async fn list_api_keys(&self, wallet: &WalletId) -> Result<Vec<ApiKeyRecord>> {
        let rows: Vec<KeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, label, key_hash, key_last4, created_at, revoked_at \
                 FROM api_keys WHERE wallet = $1 ORDER BY created_at, id",
            )
            .bind(wallet.as_str())
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(key_from_row).collect()
    }

    /// The active (unrevoked) key with this hash. The lookup is by an
    /// indexed hash of a 256-bit secret, so its timing reveals nothing
    /// useful; the caller still compares the hash in constant time.
    pub async fn find_api_key(&self, key_hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>> {
        let row: Option<KeyRow> = with_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id, wallet, label, key_hash, key_last4, created_at, revoked_at \
                 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .bind(&key_hash[..])
            .fetch_optional(pool)
            .await?
        });
        row.map(key_from_row).transpose()
    }

    /// Revoke one of the wallet's keys. False when the wallet has no such
    /// active key.
    pub async fn revoke_api_key(&self, wallet: &WalletId, id: &str) -> Result<bool> {
        let now = self.now_ms();
        let done = with_pool!(self, |pool| {
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND wallet = $3 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .bind(wallet.as_str())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }
}
