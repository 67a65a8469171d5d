//! Offers and challenges: what a paid resource costs and the 402 that asks
//! for it (x402 v1 body, v2 `PAYMENT-REQUIRED`, MPP `WWW-Authenticate`).

use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde_json::Value;

use super::{header, Payments};
use crate::money::Micros;
use crate::payments::mpp;
use crate::payments::x402::{self, Offer};

impl Payments {
    /// The resource URL of a request: the configured public base URL (or
    /// `http://` + Host) followed by the path and query.
    pub fn resource_url(&self, headers: &HeaderMap, uri: &Uri) -> String {
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match &self.inner.cfg.public_base_url {
            Some(base) => format!("{}{pq}", base.trim_end_matches('/')),
            None => {
                let host = header(headers, "host").unwrap_or("localhost");
                format!("http://{host}{pq}")
            }
        }
    }

    /// An offer for the request at `uri`.
    pub fn offer(&self, headers: &HeaderMap, uri: &Uri, price: Micros, description: &str) -> Offer {
        Offer {
            resource_url: self.resource_url(headers, uri),
            price,
            description: description.to_owned(),
            mime_type: "application/json".to_owned(),
        }
    }

    /// The challenge headers: `PAYMENT-REQUIRED` (x402 v2) and, with MPP,
    /// `WWW-Authenticate: Payment`.
    pub fn challenge_headers(&self, offer: &Offer, reason: &str) -> HeaderMap {
        let cfg = &self.inner.cfg;
        let mut h = HeaderMap::new();
        let v2 = x402::payment_required_v2(cfg, offer, reason);
        if let Ok(v) = HeaderValue::from_str(&x402::encode_header_json(&v2)) {
            h.insert(HeaderName::from_static(x402::PAYMENT_REQUIRED), v);
        }
        if let Some(m) = &cfg.mpp {
            let ch = mpp::issue(m, &cfg.networks[0], &cfg.mpp_recipient(), offer, self.now());
            if let Ok(v) = HeaderValue::from_str(&ch.www_authenticate()) {
                h.insert(axum::http::header::WWW_AUTHENTICATE, v);
            }
        }
        h
    }

    /// The x402 v1 body of a 402 for `offer`.
    pub fn challenge_body(&self, offer: &Offer, reason: &str) -> Value {
        x402::payment_required_v1(&self.inner.cfg, offer, reason)
    }
}
