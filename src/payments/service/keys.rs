//! API keys: minted for a wallet (the secret shown once, only its hash
//! stored), listed and revoked.

use super::Payments;
use crate::payments::apikey;
use crate::payments::error::PaymentError;
use crate::store::{ApiKeyRecord, WalletId};

impl Payments {
    /// Mint a key for `wallet`; the secret is returned once and only its
    /// hash is stored.
    pub async fn create_api_key(
        &self,
        wallet: &WalletId,
        label: &str,
    ) -> Result<(apikey::NewKey, ApiKeyRecord), PaymentError> {
        let key = apikey::generate();
        let rec = self
            .inner
            .store
            .insert_api_key(wallet, label, &key.hash, &key.last4)
            .await?;
        Ok((key, rec))
    }

    pub async fn list_api_keys(
        &self,
        wallet: &WalletId,
    ) -> Result<Vec<ApiKeyRecord>, PaymentError> {
        Ok(self.inner.store.list_api_keys(wallet).await?)
    }

    pub async fn revoke_api_key(&self, wallet: &WalletId, id: &str) -> Result<bool, PaymentError> {
        let revoked = self.inner.store.revoke_api_key(wallet, id).await?;
        self.inner.keys.clear();
        Ok(revoked)
    }
}
