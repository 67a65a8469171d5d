//! Client of an x402 facilitator (`POST /verify`, `POST /settle`,
//! `GET /supported`). The base URL is configuration; tests point it at a
//! loopback server speaking the same API.
//!
//! Both POST bodies are `{"x402Version", "paymentPayload",
//! "paymentRequirements"}`. Any transport failure, non-2xx status or
//! unreadable body is an error: the caller refuses the payment and consumes
//! nothing.
//!
//! A hosted facilitator wants credentials ([`FacilitatorAuth`]): a static
//! bearer token, or a Coinbase CDP API key, with which every request carries
//! `Authorization: Bearer <JWT>` signed for that one request. The CDP JWT
//! has the header `{alg, kid: key id, nonce: 16 random bytes hex, typ: JWT}`
//! and the claims `{sub: key id, iss: "cdp", nbf: now, exp: now + 120,
//! uri: "METHOD host/path"}`, signed ES256 (an EC P-256 key, PEM) or EdDSA
//! (an Ed25519 key, base64 of seed ‖ public key).

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

use super::error::PaymentError;

/// How long a CDP request JWT is valid (the CDP SDKs' default).
const CDP_JWT_LIFETIME_SECS: u64 = 120;
/// The most bytes read from a credentials file.
pub const MAX_CREDENTIAL_FILE_BYTES: u64 = 16 * 1024;

/// A CDP API key's private half.
#[derive(Clone)]
enum CdpSigner {
    Es256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

/// A Coinbase CDP API key: its id and private key. Never printed.
#[derive(Clone)]
pub struct CdpKey {
    id: String,
    signer: CdpSigner,
}

impl std::fmt::Debug for CdpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let alg = match self.signer {
            CdpSigner::Es256(_) => "ES256",
            CdpSigner::Ed25519(_) => "EdDSA",
        };
        f.debug_struct("CdpKey")
            .field("id", &self.id)
            .field("alg", &alg)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl CdpKey {
    /// A key from its id and secret: an EC private key in PEM (SEC1 `EC
    /// PRIVATE KEY` or PKCS#8 `PRIVATE KEY`, P-256), or an Ed25519 key as
    /// base64 of 64 bytes (seed ‖ public key) or of the 32-byte seed.
    pub fn new(id: &str, secret: &str) -> Result<Self, PaymentError> {
        let id = id.trim();
        if id.is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
            return Err(PaymentError::BadRequest(
                "the CDP API key id is empty or malformed",
            ));
        }
        let secret = secret.trim();
        let signer = if secret.contains("-----BEGIN") {
            use p256::pkcs8::DecodePrivateKey as _;
            // PEM text from a JSON file or an environment variable often
            // carries its line breaks escaped.
            let pem = Zeroizing::new(secret.replace("\\n", "\n"));
            let key = p256::SecretKey::from_sec1_pem(&pem)
                .or_else(|_| p256::SecretKey::from_pkcs8_pem(&pem))
                .map_err(|_| {
                    PaymentError::BadRequest("the CDP API key secret is not a P-256 PEM key")
                })?;
            CdpSigner::Es256(p256::ecdsa::SigningKey::from(key))
        } else {
            let bytes = Zeroizing::new(STANDARD.decode(secret).map_err(|_| {
                PaymentError::BadRequest("the CDP API key secret is neither PEM nor base64")
            })?);
            let key = match bytes.len() {
                64 => {
                    let mut kp = Zeroizing::new([0u8; 64]);
                    kp.copy_from_slice(&bytes);
                    ed25519_dalek::SigningKey::from_keypair_bytes(&kp).map_err(|_| {
                        PaymentError::BadRequest(
                            "the CDP Ed25519 key's public half does not match its seed",
                        )
                    })?
                }
                32 => {
                    let mut seed = Zeroizing::new([0u8; 32]);
                    seed.copy_from_slice(&bytes);
                    ed25519_dalek::SigningKey::from_bytes(&seed)
                }
                _ => {
                    return Err(PaymentError::BadRequest(
                        "the CDP Ed25519 key secret must be 32 or 64 bytes",
                    ))
                }
            };
            CdpSigner::Ed25519(key)
        };
        Ok(CdpKey {
            id: id.to_owned(),
            signer,
        })
    }

    /// A key from the text of a key file: the JSON the CDP portal offers
    /// (`{"id" | "name": …, "privateKey": …}`), or the bare secret, whose
    /// id is then `id`. An id given explicitly wins over the file's.
    pub fn from_file_text(text: &str, id: Option<&str>) -> Result<Self, PaymentError> {
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            let v: Zeroizing<String> = Zeroizing::new(trimmed.to_owned());
            let json: Value = serde_json::from_str(&v)
                .map_err(|_| PaymentError::BadRequest("the CDP key file is not valid JSON"))?;
            let secret = Zeroizing::new(
                json.get("privateKey")
                    .and_then(Value::as_str)
                    .ok_or(PaymentError::BadRequest(
                        "the CDP key file has no privateKey",
                    ))?
                    .to_owned(),
            );
            let file_id = json
                .get("id")
                .or_else(|| json.get("name"))
                .and_then(Value::as_str);
            let id = id.or(file_id).ok_or(PaymentError::BadRequest(
                "the CDP key id is neither given nor in the key file",
            ))?;
            return Self::new(id, &secret);
        }
        let id = id.ok_or(PaymentError::BadRequest(
            "a bare CDP key secret needs its key id",
        ))?;
        Self::new(id, trimmed)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The request JWT for `method` on `host` + `path`, valid from `now`
    /// (Unix seconds) for two minutes.
    pub fn jwt(&self, method: &str, host: &str, path: &str, now: u64) -> String {
        let mut nonce = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let alg = match self.signer {
            CdpSigner::Es256(_) => "ES256",
            CdpSigner::Ed25519(_) => "EdDSA",
        };
        let header = serde_json::json!({
            "alg": alg, "kid": self.id, "nonce": hex::encode(nonce), "typ": "JWT",
        });
        let claims = serde_json::json!({
            "sub": self.id,
            "iss": "cdp",
            "nbf": now,
            "exp": now + CDP_JWT_LIFETIME_SECS,
            "uri": format!("{} {host}{path}", method.to_ascii_uppercase()),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = match &self.signer {
            CdpSigner::Es256(k) => {
                use p256::ecdsa::signature::Signer as _;
                let s: p256::ecdsa::Signature = k.sign(signing_input.as_bytes());
                // JWS ES256 is the raw r ‖ s, 64 bytes.
                s.to_bytes().to_vec()
            }
            CdpSigner::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(signing_input.as_bytes()).to_bytes().to_vec()
            }
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// The credentials sent to the facilitator.
#[derive(Clone, Default)]
pub enum FacilitatorAuth {
    /// No credentials (a facilitator that asks for none, such as x402.org's).
    #[default]
    None,
    /// `Authorization: Bearer <token>` on every request.
    Bearer(Zeroizing<String>),
    /// A CDP API key: a fresh signed JWT on every request (boxed: the key is
    /// large beside the other variants).
    Cdp(Box<CdpKey>),
}

impl std::fmt::Debug for FacilitatorAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FacilitatorAuth::None => f.write_str("None"),
            FacilitatorAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            FacilitatorAuth::Cdp(k) => f.debug_tuple("Cdp").field(k).finish(),
        }
    }
}

impl FacilitatorAuth {
    /// A bearer token; refused when empty or not a valid header value.
    pub fn bearer(token: &str) -> Result<Self, PaymentError> {
        let t = token.trim();
        if t.is_empty() || t.len() > 8192 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PaymentError::BadRequest(
                "the facilitator token is empty or not printable ASCII",
            ));
        }
        Ok(FacilitatorAuth::Bearer(Zeroizing::new(t.to_owned())))
    }

    /// The `Authorization` value for a request, if any.
    fn header(&self, method: &str, url: &reqwest::Url) -> Option<Zeroizing<String>> {
        match self {
            FacilitatorAuth::None => None,
            FacilitatorAuth::Bearer(t) => Some(Zeroizing::new(format!("Bearer {}", t.as_str()))),
            FacilitatorAuth::Cdp(k) => {
                let host = match (url.host_str(), url.port()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    (Some(h), None) => h.to_owned(),
                    (None, _) => String::new(),
                };
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let jwt = k.jwt(method, &host, url.path(), now);
                Some(Zeroizing::new(format!("Bearer {jwt}")))
            }
        }
    }
}

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
    auth: FacilitatorAuth,
}

impl FacilitatorClient {
    pub fn new(base_url: &str) -> Result<Self, PaymentError> {
        Self::with_auth(base_url, FacilitatorAuth::None)
    }

    /// A client that sends `auth` with every request.
    pub fn with_auth(base_url: &str, auth: FacilitatorAuth) -> Result<Self, PaymentError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| PaymentError::FacilitatorUnavailable(e.to_string()))?;
        Ok(FacilitatorClient {
            base: base_url.trim_end_matches('/').to_owned(),
            http,
            auth,
        })
    }

    /// A request to `path` below the base URL, with the credentials.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, PaymentError> {
        let url = reqwest::Url::parse(&format!("{}{path}", self.base)).map_err(|e| {
            PaymentError::FacilitatorUnavailable(format!("bad facilitator URL: {e}"))
        })?;
        let auth = self.auth.header(method.as_str(), &url);
        let mut req = self.http.request(method, url);
        if let Some(v) = auth {
            let mut value = reqwest::header::HeaderValue::from_str(&v).map_err(|_| {
                PaymentError::FacilitatorUnavailable("credentials are not a valid header".into())
            })?;
            value.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, value);
        }
        Ok(req)
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
            .request(reqwest::Method::GET, "/supported")?
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
            .request(reqwest::Method::POST, path)?
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
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(PaymentError::FacilitatorUnavailable(format!(
                "status {status}: the facilitator refused this coordinator's credentials"
            )));
        }
        return Err(PaymentError::FacilitatorUnavailable(format!(
            "status {status}"
        )));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| PaymentError::FacilitatorUnavailable(format!("bad response: {e}")))
}
