//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). Each
//! takes arbitrary bytes and must never panic.

/// The `evidence` JSON object, then the parser its format selects.
pub fn evidence_json(data: &[u8]) {
    if let Ok(ev) = super::Evidence::from_json(data) {
        match ev.format {
            super::EvidenceFormat::SevSnp => snp_report(&ev.report.0),
            super::EvidenceFormat::Tdx => tdx_quote(&ev.report.0),
            super::EvidenceFormat::Simulated => {
                let _ = super::sim::SimReport::parse(&ev.report.0);
            }
        }
        let _ = ev.to_json_pretty();
    }
}

/// An SEV-SNP report and, read from the same bytes, a certificate table.
pub fn snp_report(data: &[u8]) {
    if let Ok(r) = super::snp::SnpReport::parse(data) {
        let _ = (
            r.reported_tcb(),
            r.candidate_products(),
            r.debug_allowed(),
            r.signing_key(),
        );
    }
    if let Ok(t) = super::snp::parse_cert_table(data) {
        let _ = super::snp::certs_from_table(&t);
    }
}

/// A TDX DCAP quote.
pub fn tdx_quote(data: &[u8]) {
    if let Ok(q) = super::tdx::TdxQuote::parse(data) {
        let _ = (q.fields(), q.fmspc_and_ca());
    }
}
