//! The pinned vendor roots, compiled in from `attestation/` and never fetched:
//! AMD's ARK (root) and ASK (intermediate) for Milan, Genoa and Turin, and
//! Intel's SGX root CA for TDX quotes.

use der::{Decode, DecodePem, Encode};
use x509_cert::Certificate;

/// Intel SGX Root CA (DER), the anchor of every TDX quote's PCK chain.
pub const INTEL_SGX_ROOT_CA_DER: &[u8] =
    include_bytes!("../../attestation/intel/TrustedRootCA.der");

/// One AMD product line (EPYC generation) and its pinned certificates.
#[derive(Clone)]
pub struct AmdProduct {
    /// KDS product name: `Milan`, `Genoa`, `Turin`.
    pub name: &'static str,
    pub ark: Certificate,
    pub ark_der: Vec<u8>,
    pub ask: Certificate,
    pub ask_der: Vec<u8>,
}

impl std::fmt::Debug for AmdProduct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AmdProduct({})", self.name)
    }
}

impl AmdProduct {
    /// The policy key for this product (`milan`, …).
    pub fn key(&self) -> String {
        self.name.to_ascii_lowercase()
    }
}

const AMD_PEMS: [(&str, &str, &str); 3] = [
    (
        "Milan",
        include_str!("../../attestation/amd/milan/ark.pem"),
        include_str!("../../attestation/amd/milan/ask.pem"),
    ),
    (
        "Genoa",
        include_str!("../../attestation/amd/genoa/ark.pem"),
        include_str!("../../attestation/amd/genoa/ask.pem"),
    ),
    (
        "Turin",
        include_str!("../../attestation/amd/turin/ark.pem"),
        include_str!("../../attestation/amd/turin/ask.pem"),
    ),
];

/// The built-in AMD products. The PEM files ship with the code and a unit
/// test parses every one, so a failure here is a broken build.
pub fn amd_products() -> Vec<AmdProduct> {
    AMD_PEMS
        .iter()
        .map(|(name, ark, ask)| {
            let ark = Certificate::from_pem(ark.as_bytes())
                .unwrap_or_else(|e| panic!("attestation/amd/{name} ark.pem: {e}"));
            let ask = Certificate::from_pem(ask.as_bytes())
                .unwrap_or_else(|e| panic!("attestation/amd/{name} ask.pem: {e}"));
            AmdProduct {
                name,
                ark_der: ark.to_der().unwrap_or_default(),
                ask_der: ask.to_der().unwrap_or_default(),
                ark,
                ask,
            }
        })
        .collect()
}

/// Parse a DER certificate with a size cap.
pub fn parse_der_cert(der: &[u8]) -> Result<Certificate, String> {
    if der.len() > super::evidence::MAX_CERT {
        return Err(format!("certificate is {} bytes", der.len()));
    }
    Certificate::from_der(der).map_err(|e| format!("not a DER X.509 certificate: {e}"))
}

/// The common name of a certificate subject or issuer, for messages.
pub fn common_name(name: &x509_cert::name::Name) -> String {
    name.to_string()
        .split(',')
        .find_map(|p| p.trim().strip_prefix("CN=").map(str::to_string))
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_roots_parse_and_chain() {
        let products = amd_products();
        assert_eq!(products.len(), 3);
        for p in &products {
            assert_eq!(
                common_name(&p.ark.tbs_certificate.subject),
                format!("ARK-{}", p.name)
            );
            assert_eq!(
                common_name(&p.ask.tbs_certificate.subject),
                format!("SEV-{}", p.name)
            );
            assert_eq!(p.ask.tbs_certificate.issuer, p.ark.tbs_certificate.subject);
        }
        let intel = Certificate::from_der(INTEL_SGX_ROOT_CA_DER).unwrap();
        assert_eq!(
            common_name(&intel.tbs_certificate.subject),
            "Intel SGX Root CA"
        );
    }
}
