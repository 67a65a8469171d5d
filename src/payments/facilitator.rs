//! Client of an x402 facilitator (`POST /verify`, `POST /settle`,
//! `GET /supported`). The base URL is configuration; tests point it at a
//! loopback server speaking the same API.
//!
//! Both POST bodies are `{"x402Version", "paymentPayload",
//! "paymentRequirements"}`. Any transport failure, non-2xx status or
//! unreadable body is an error: the caller refuses the payment and consumes
//! nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::PaymentError;

/// The most bytes read from a facilitator response.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    pub is_valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default)]
    pub transaction: String,
    #[serde(default)]
    pub network: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupportedResponse {
    pub kinds: Vec<SupportedKind>,
}

#[derive(Clone, Debug)]
pub struct FacilitatorClient {
    base: String,
    http: reqwest::Client,
}

impl FacilitatorClient {
    pub fn new(base_url: &str) -> Result<Self, PaymentError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| PaymentError::FacilitatorUnavailable(e.to_string()))?;
        Ok(FacilitatorClient {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `POST /verify`.
    pub async fn verify(
        &self,
        version: u8,
        payload: &Value,
        requirements: &Value,
    ) -> Result<VerifyResponse, PaymentError> {
        self.post("/verify", version, payload, requirements).await
    }

    /// `POST /settle`.
    pub async fn settle(
        &self,
        version: u8,
        payload: &Value,
        requirements: &Value,
    ) -> Result<SettleResponse, PaymentError> {
        self.post("/settle", version, payload, requirements).await
    }

    /// `GET /supported`.
    pub async fn supported(&self) -> Result<SupportedResponse, PaymentError> {
        let resp = self
            .http
            .get(format!("{}/supported", self.base))
            .send()
            .await
            .map_err(|e| PaymentError::FacilitatorUnavailable(e.to_string()))?;
        read_json(resp).await
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        version: u8,
        payload: &Value,
        requirements: &Value,
    ) -> Result<T, PaymentError> {
        let body = serde_json::json!({
            "x402Version": version,
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        });
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| PaymentError::FacilitatorUnavailable(e.to_string()))?;
        read_json(resp).await
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    mut resp: reqwest::Response,
) -> Result<T, PaymentError> {
    let status = resp.status();
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| PaymentError::FacilitatorUnavailable(e.to_string()))?
    {
        if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(PaymentError::FacilitatorUnavailable(
                "response too large".into(),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        // Facilitators answer a refused verify/settle with 400 and the same
        // JSON shape; read it when it parses, so the client sees the reason.
        if let Ok(v) = serde_json::from_slice::<T>(&buf) {
            return Ok(v);
        }
        return Err(PaymentError::FacilitatorUnavailable(format!(
            "status {status}"
        )));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| PaymentError::FacilitatorUnavailable(format!("bad response: {e}")))
}
