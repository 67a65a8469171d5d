//! Intel TDX: DCAP quotes (v4, and v5 with TD report 1.0, 1.5 and 1.5ex),
//! parsed and verified with `dcap-qvl` against the pinned Intel SGX root CA
//! and the quote's collateral, with the clock given by the caller.

use dcap_qvl::quote::Quote;
use dcap_qvl::QuoteCollateralV3;

use super::roots::INTEL_SGX_ROOT_CA_DER;

/// TDX's TEE type in the quote header.
const TEE_TYPE_TDX: u32 = 0x81;

/// A parsed TDX quote with its raw bytes.
#[derive(Clone)]
pub struct TdxQuote {
    raw: Vec<u8>,
    quote: Quote,
}

impl std::fmt::Debug for TdxQuote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TdxQuote(v{})", self.quote.header.version)
    }
}

/// The TD report fields the policy looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdFields {
    pub mr_td: [u8; 48],
    pub rtmr: [[u8; 48]; 4],
    pub report_data: [u8; 64],
    pub td_attributes: [u8; 8],
}

impl TdFields {
    /// TD_ATTRIBUTES bit 0: the TD is debuggable.
    pub fn debug(&self) -> bool {
        self.td_attributes[0] & 1 != 0
    }
}

impl TdxQuote {
    /// Parse a quote: a TDX quote (v4 or v5), nothing but zero padding after
    /// its authentication data, at most [`super::evidence::MAX_REPORT`] bytes.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.len() > super::evidence::MAX_REPORT {
            return Err(format!("quote is {} bytes", raw.len()));
        }
        let quote = Quote::parse(raw).map_err(|e| format!("not a DCAP quote: {e}"))?;
        if quote.header.tee_type != TEE_TYPE_TDX || quote.report.as_td10().is_none() {
            return Err(format!(
                "not a TDX quote (TEE type {:#x}, version {})",
                quote.header.tee_type, quote.header.version
            ));
        }
        // After the signed header and body comes u32 LE auth-data length and
        // the auth data. Quote buffers handed out by quoting services may be
        // zero-padded after that; anything else there is refused, because no
        // signature covers it.
        let signed = quote.signed_length();
        let len_bytes = raw
            .get(signed..signed + 4)
            .ok_or("quote ends inside its auth-data length")?;
        let auth_len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        let end = signed + 4 + auth_len as usize;
        let tail = raw.get(end..).ok_or("quote ends inside its auth data")?;
        if tail.iter().any(|b| *b != 0) {
            return Err(format!(
                "quote has {} bytes after its structure (which ends at {end}) that are not zero padding",
                tail.len()
            ));
        }
        Ok(TdxQuote {
            raw: raw.to_vec(),
            quote,
        })
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn version(&self) -> u16 {
        self.quote.header.version
    }

    pub fn quote(&self) -> &Quote {
        &self.quote
    }

    pub fn fields(&self) -> TdFields {
        // `parse` checked that this is a TD report.
        let td = self.quote.report.as_td10();
        let Some(td) = td else {
            return TdFields {
                mr_td: [0; 48],
                rtmr: [[0; 48]; 4],
                report_data: [0; 64],
                td_attributes: [0xff; 8],
            };
        };
        TdFields {
            mr_td: td.mr_td,
            rtmr: [td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3],
            report_data: td.report_data,
            td_attributes: td.td_attributes,
        }
    }

    /// The FMSPC and PCK CA (`processor` or `platform`) from the quote's PCK
    /// certificate, which is what the PCS collateral is looked up by.
    pub fn fmspc_and_ca(&self) -> Result<([u8; 6], &'static str), String> {
        let fmspc = dcap_qvl::intel::quote_fmspc(&self.quote)
            .map_err(|e| format!("no FMSPC in the quote's PCK certificate: {e}"))?;
        let chain = dcap_qvl::intel::extract_cert_chain(&self.quote)
            .map_err(|e| format!("no PCK chain in the quote: {e}"))?;
        let leaf = chain.first().ok_or("empty PCK chain")?;
        let ca = match dcap_qvl::intel::pck_ca(leaf).map_err(|e| e.to_string())? {
            dcap_qvl::config::PckCa::Platform => "platform",
            dcap_qvl::config::PckCa::Processor => "processor",
        };
        Ok((fmspc, ca))
    }
}

/// What dcap-qvl established.
#[derive(Debug, Clone)]
pub struct QuoteVerified {
    /// Intel's TCB status of the platform, e.g. `UpToDate`.
    pub status: String,
    pub advisory_ids: Vec<String>,
}

/// Which step a dcap-qvl failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteFailure {
    /// The collateral is not valid at `now` (issue dates, next updates, CRLs).
    Collateral,
    /// No TCB level of the collateral matches the platform, or it is revoked.
    Tcb,
    /// Signatures, certificate chains, QE identity.
    Signature,
}

/// Verify the quote with dcap-qvl (rustcrypto backend) against the pinned
/// Intel root, at `now` (unix seconds).
pub fn verify_quote(
    quote: &TdxQuote,
    collateral: &QuoteCollateralV3,
    now: u64,
) -> Result<QuoteVerified, (QuoteFailure, String)> {
    let verifier = dcap_qvl::verify::QuoteVerifier::new(INTEL_SGX_ROOT_CA_DER.to_vec())
        .with_config::<dcap_qvl::configs::RustCryptoConfig>();
    match verifier.verify(&quote.raw, collateral, now) {
        Ok(r) => Ok(QuoteVerified {
            status: r.status,
            advisory_ids: r.advisory_ids,
        }),
        Err(e) => {
            let msg = format!("{e:#}");
            let lower = msg.to_ascii_lowercase();
            let kind = if lower.contains("tcb level") || lower.contains("revoked") {
                QuoteFailure::Tcb
            } else if lower.contains("expired")
                || lower.contains("in the future")
                || lower.contains("not yet valid")
                || lower.contains("crlexpired")
            {
                QuoteFailure::Collateral
            } else {
                QuoteFailure::Signature
            };
            Err((kind, msg))
        }
    }
}

/// The issue and next-update times of the TCB info and QE identity in the
/// collateral, checked against `now`. dcap-qvl checks these too; doing it here
/// names the exact document in the verdict.
pub fn collateral_window(c: &QuoteCollateralV3, now: u64) -> Result<String, String> {
    let mut notes = Vec::new();
    for (name, json) in [("TCB info", &c.tcb_info), ("QE identity", &c.qe_identity)] {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("{name} is not JSON: {e}"))?;
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .and_then(|x| crate::timefmt::parse_rfc3339(x).map(|t| (x.to_string(), t)))
        };
        let (issue_s, issue) = get("issueDate").ok_or(format!("{name} has no issueDate"))?;
        let (next_s, next) = get("nextUpdate").ok_or(format!("{name} has no nextUpdate"))?;
        if now < issue {
            return Err(format!(
                "{name} is issued {issue_s}, after the verification time {}",
                crate::timefmt::format_rfc3339(now)
            ));
        }
        if now > next {
            return Err(format!(
                "{name} expired at {next_s}, before the verification time {}",
                crate::timefmt::format_rfc3339(now)
            ));
        }
        notes.push(format!("{name} {issue_s}…{next_s}"));
    }
    Ok(notes.join("; "))
}
