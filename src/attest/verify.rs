//! The verifier: evidence + binding + policy + options → [`Verdict`].
//!
//! Each format runs its steps in order (PROTOCOL.md §7a "Coordinator
//! verification"). A step whose inputs are missing because an earlier step
//! failed is recorded as failed "not evaluated", never as passed. Checks that
//! only read the parsed report (debug, VMPL, measurement, report data) are
//! evaluated even when the signature failed, so the verdict shows everything
//! that is wrong; the verdict passes only when nothing failed.

use subtle::ConstantTimeEq;

use super::evidence::{B64Bytes, Evidence, EvidenceFormat, SnpCerts};
use super::kds::{Fetched, KdsClient};
use super::pcs::PcsClient;
use super::policy::{Measurement, Policy};
use super::roots::amd_products;
use super::sim::SimReport;
use super::snp::{self, SnpReport, VekKind};
use super::tdx::{self, QuoteFailure, TdxQuote};
use super::verdict::{AttestationLevel, Check, CheckStatus, Claims, Step, Verdict};
use super::NodeBinding;
use crate::proto::identity::Ed25519Public;
use crate::timefmt::format_rfc3339 as rfc3339;

/// What the report data must equal.
#[derive(Debug, Clone)]
pub enum Binding {
    /// §7a: the node's keys and the coordinator's challenge. When the
    /// challenge's expiry is known (unix seconds) it is checked against `now`.
    Node {
        binding: NodeBinding,
        challenge_expires_at: Option<u64>,
    },
    /// Raw expected report data, for evidence made elsewhere (test vectors).
    /// Freshness then rests on whoever chose these bytes.
    ReportData([u8; 64]),
}

impl Binding {
    pub fn expected_report_data(&self) -> [u8; 64] {
        match self {
            Binding::Node { binding, .. } => binding.report_data(),
            Binding::ReportData(rd) => *rd,
        }
    }
}

/// How to verify. `now` is the verification time in unix seconds; the
/// verifier never reads the clock itself.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub now: u64,
    /// Explicit development mode: only then is simulated evidence accepted.
    pub dev_mode: bool,
    /// Skip only the measurement allow-list; the verdict says so.
    pub allow_any_measurement: bool,
    /// The simulated-TEE keys a development verifier trusts.
    pub simulated_keys: Vec<Ed25519Public>,
    /// Where to fetch a VCEK the evidence lacks; `None`: do not fetch.
    pub kds: Option<KdsClient>,
    /// Where to fetch TDX collateral the evidence lacks; `None`: do not fetch.
    pub pcs: Option<PcsClient>,
}

impl VerifyOptions {
    /// Production defaults at `now`: no development mode, nothing skipped,
    /// no fetching.
    pub fn new(now: u64) -> Self {
        VerifyOptions {
            now,
            dev_mode: false,
            allow_any_measurement: false,
            simulated_keys: Vec::new(),
            kds: None,
            pcs: None,
        }
    }

    /// Fetch what evidence lacks from the vendors' services (or stand-ins at
    /// these base URLs), caching answers under `cache_dir`.
    pub fn with_vendor_services(
        mut self,
        kds_url: &str,
        pcs_url: &str,
        root_crl_url: &str,
        cache_dir: Option<std::path::PathBuf>,
    ) -> Self {
        self.kds = Some(KdsClient::new(kds_url, cache_dir.clone()));
        self.pcs = Some(PcsClient::new(pcs_url, root_crl_url, cache_dir));
        self
    }
}

struct Run {
    checks: Vec<Check>,
    claims: Claims,
    fetched_certs: Option<SnpCerts>,
    fetched_collateral: Option<dcap_qvl::QuoteCollateralV3>,
}

impl Run {
    fn push(&mut self, step: Step, status: CheckStatus, detail: impl Into<String>) {
        // A step appears once; a later, more specific result replaces it.
        let detail = detail.into();
        if let Some(c) = self.checks.iter_mut().find(|c| c.step == step) {
            c.status = status;
            c.detail = detail;
        } else {
            self.checks.push(Check {
                step,
                status,
                detail,
            });
        }
    }
    fn pass(&mut self, step: Step, detail: impl Into<String>) {
        self.push(step, CheckStatus::Pass, detail)
    }
    fn fail(&mut self, step: Step, detail: impl Into<String>) {
        self.push(step, CheckStatus::Fail, detail)
    }
    fn result(&mut self, step: Step, r: Result<String, String>) {
        match r {
            Ok(d) => self.pass(step, d),
            Err(d) => self.fail(step, d),
        }
    }
}

/// Verify `evidence` against `binding` and `policy`.
///
/// This is the stable entry point the coordinator calls (PROTOCOL.md §7a). It
/// never fails: every problem is a failed check in the returned [`Verdict`],
/// and `verdict.verified` is true only when no check failed. It is async
/// because it may fetch a VCEK (`opts.kds`) or TDX collateral (`opts.pcs`);
/// whatever it fetched is returned in the verdict so a coordinator can add it
/// to the evidence it publishes (§7b).
pub async fn verify_evidence(
    evidence: &Evidence,
    binding: &Binding,
    policy: &Policy,
    opts: &VerifyOptions,
) -> Verdict {
    let mut run = Run {
        checks: Vec::new(),
        claims: Claims::default(),
        fetched_certs: None,
        fetched_collateral: None,
    };
    let mut level = AttestationLevel::None;
    match evidence.check_limits() {
        Err(e) => run.fail(Step::Format, e.to_string()),
        Ok(()) => {
            run.pass(
                Step::Format,
                format!(
                    "{} evidence, {} bytes of report",
                    evidence.format,
                    evidence.report.0.len()
                ),
            );
            level = match evidence.format {
                EvidenceFormat::SevSnp => {
                    verify_snp(&mut run, evidence, binding, policy, opts).await;
                    AttestationLevel::Hardware
                }
                EvidenceFormat::Tdx => {
                    verify_tdx(&mut run, evidence, binding, policy, opts).await;
                    AttestationLevel::Hardware
                }
                EvidenceFormat::Simulated => {
                    verify_sim(&mut run, evidence, binding, policy, opts);
                    AttestationLevel::Simulated
                }
            };
        }
    }
    if !evidence.gpu.is_empty() {
        // §7a: a verifier that does not verify GPU evidence must not claim it.
        let n = evidence.gpu.len();
        run.push(
            Step::Gpu,
            CheckStatus::Skipped,
            format!(
                "{n} GPU evidence entr{} carried but not verified by this version; no GPU attestation is claimed",
                if n == 1 { "y" } else { "ies" }
            ),
        );
    }
    let verified =
        !run.checks.is_empty() && run.checks.iter().all(|c| c.status != CheckStatus::Fail);
    Verdict {
        format: evidence.format,
        verified,
        attestation_level: if verified {
            level
        } else {
            AttestationLevel::None
        },
        checks: run.checks,
        policy_digest: policy.digest(),
        verified_at_unix: opts.now,
        verified_at: rfc3339(opts.now),
        claims: run.claims,
        gpu_verified: false,
        fetched_certs: run.fetched_certs,
        fetched_collateral: run.fetched_collateral,
    }
}

fn hardware_dev_mode(run: &mut Run) {
    run.pass(
        Step::DevMode,
        "hardware evidence (development mode is not needed and changes nothing)",
    );
}

fn check_report_data(run: &mut Run, actual: &[u8; 64], binding: &Binding, opts: &VerifyOptions) {
    let expected = binding.expected_report_data();
    run.claims.report_data = Some(hex::encode(actual));
    if bool::from(actual.ct_eq(&expected)) {
        let what = match binding {
            Binding::Node { binding, .. } => format!(
                "report_data binds node {} (ed25519 {}, x25519 {}, key version {}) and the challenge",
                binding.node_id, binding.ed25519, binding.x25519, binding.key_version
            ),
            Binding::ReportData(_) => "report_data equals the expected bytes".to_string(),
        };
        run.pass(Step::ReportData, what);
    } else {
        run.fail(
            Step::ReportData,
            format!(
                "report_data {} is not the expected {}",
                hex::encode(actual),
                hex::encode(expected)
            ),
        );
    }
    match binding {
        Binding::Node {
            binding,
            challenge_expires_at,
        } => {
            if binding.challenge.is_empty() {
                run.fail(Step::Freshness, "the challenge is empty");
            } else if let Some(exp) = challenge_expires_at {
                if opts.now > *exp {
                    run.fail(
                        Step::Freshness,
                        format!(
                            "the challenge expired at {}, before the verification time {}",
                            rfc3339(*exp),
                            rfc3339(opts.now)
                        ),
                    );
                } else {
                    run.pass(
                        Step::Freshness,
                        format!("bound to a challenge valid until {}", rfc3339(*exp)),
                    );
                }
            } else {
                run.pass(
                    Step::Freshness,
                    "bound to the given challenge (its issuer checks that it is live and unused)",
                );
            }
        }
        Binding::ReportData(_) => run.push(
            Step::Freshness,
            CheckStatus::Skipped,
            "no challenge given (raw expected report data); freshness rests on whoever chose it",
        ),
    }
}

fn check_measurement(
    run: &mut Run,
    what: &str,
    actual: &[u8; 48],
    allowed: &[Measurement],
    opts: &VerifyOptions,
) {
    let hexm = hex::encode(actual);
    if opts.allow_any_measurement {
        run.push(
            Step::Measurement,
            CheckStatus::Skipped,
            format!("{what} {hexm} not checked: the allow-list was skipped on request (--allow-any-measurement)"),
        );
    } else if allowed.iter().any(|m| m.0 == *actual) {
        run.pass(
            Step::Measurement,
            format!("{what} {hexm} is on the policy's allow-list"),
        );
    } else if allowed.is_empty() {
        run.fail(
            Step::Measurement,
            format!("{what} {hexm}: the policy's allow-list is empty"),
        );
    } else {
        run.fail(
            Step::Measurement,
            format!("{what} {hexm} is not on the policy's allow-list"),
        );
    }
}

async fn verify_snp(
    run: &mut Run,
    ev: &Evidence,
    binding: &Binding,
    policy: &Policy,
    opts: &VerifyOptions,
) {
    hardware_dev_mode(run);
    let report = match SnpReport::parse(&ev.report.0) {
        Ok(r) => r,
        Err(e) => return run.fail(Step::Parse, e),
    };
    let tcb = report.reported_tcb();
    let chip_id = report.chip_id();
    run.pass(
        Step::Parse,
        format!(
            "SEV-SNP report v{}, VMPL {}, policy {:#x}, reported TCB {tcb}",
            report.version(),
            report.vmpl(),
            report.guest_policy()
        ),
    );
    run.claims.measurement = Some(hex::encode(report.measurement()));
    run.claims.chip_id = Some(hex::encode(chip_id));
    run.claims.reported_tcb = Some(tcb.to_string());

    // Certificates: the VEK from the evidence, else from KDS.
    let certs = ev.certs.clone().unwrap_or_default();
    let mut vek_der: Option<Vec<u8>> = certs
        .vcek
        .as_ref()
        .or(certs.vlek.as_ref())
        .map(|b| b.0.clone());
    if vek_der.is_some() {
        run.pass(
            Step::Certificates,
            format!(
                "{} from the evidence",
                if certs.vlek.is_some() { "VLEK" } else { "VCEK" }
            ),
        );
    } else if report.signing_key() == 1 {
        run.fail(Step::Certificates, "the report is VLEK-signed and the evidence has no VLEK (KDS serves VLEKs only to their provider)");
    } else if let Some(kds) = &opts.kds {
        let mut errors = Vec::new();
        for product in report.candidate_products() {
            match kds.vcek(product, &chip_id, &tcb).await {
                Ok(Some((der, how))) => {
                    run.pass(
                        Step::Certificates,
                        format!(
                            "VCEK for {product} {} ({})",
                            match how {
                                Fetched::Network => "fetched from AMD KDS",
                                Fetched::Cache => "from the KDS cache",
                            },
                            kds.vcek_url(product, &chip_id, &tcb)
                        ),
                    );
                    run.fetched_certs = Some(SnpCerts {
                        vcek: Some(B64Bytes(der.clone())),
                        ..Default::default()
                    });
                    vek_der = Some(der);
                    break;
                }
                Ok(None) => errors.push(format!("{product}: KDS has no VCEK (404)")),
                Err(e) => errors.push(format!("{product}: {e}")),
            }
        }
        if vek_der.is_none() {
            run.fail(
                Step::Certificates,
                format!("no VCEK: {}", errors.join("; ")),
            );
        }
    } else {
        run.fail(
            Step::Certificates,
            "the evidence has no VCEK and no KDS is configured to fetch one",
        );
    }

    // Chain and signature.
    let products = amd_products();
    let chain = match &vek_der {
        Some(der) => {
            match snp::verify_chain(
                der,
                certs.ask.as_ref().map(|b| b.0.as_slice()),
                certs.ark.as_ref().map(|b| b.0.as_slice()),
                &products,
                opts.now,
            ) {
                Ok(c) => {
                    run.pass(Step::Chain, c.detail.clone());
                    Some(c)
                }
                Err(e) => {
                    run.fail(Step::Chain, e);
                    None
                }
            }
        }
        None => {
            run.fail(Step::Chain, "not evaluated: no VEK certificate");
            None
        }
    };
    match &chain {
        Some(c) => run.result(
            Step::Signature,
            report.verify_signature(&c.vek).map(|()| {
                "ECDSA P-384/SHA-384 over [0x000, 0x2A0) verifies under the VEK".to_string()
            }),
        ),
        None => run.fail(
            Step::Signature,
            "not evaluated: no VEK that chains to a pinned AMD root",
        ),
    }
    let product = chain.as_ref().map(|c| c.product);
    run.claims.product = product.map(str::to_string);

    // Key kind.
    match &chain {
        Some(c) => {
            let reported = match report.signing_key() {
                0 => Some(VekKind::Vcek),
                1 => Some(VekKind::Vlek),
                _ => None,
            };
            let r = if reported != Some(c.kind) {
                Err(format!(
                    "the report's SIGNING_KEY is {} but the certificate is a {}",
                    report.signing_key(),
                    c.kind.as_str()
                ))
            } else if c.kind == VekKind::Vlek && !policy.snp.allow_vlek {
                Err("signed with a VLEK and the policy does not allow VLEKs".into())
            } else {
                Ok(format!("signed with a {}", c.kind.as_str()))
            };
            run.result(Step::KeyKind, r);
        }
        None => run.fail(Step::KeyKind, "not evaluated: no trusted VEK"),
    }

    // The VEK's extensions against the report.
    match &chain {
        Some(c) => {
            let ext = snp::vek_extensions(&c.vek);
            run.result(
                Step::ChipId,
                snp::hw_id_matches(&ext, &chip_id)
                    .map(|()| "the VEK's hwID equals CHIP_ID".to_string()),
            );
            run.result(
                Step::VekTcb,
                snp::tcb_matches(&ext, &tcb)
                    .map(|()| format!("the VEK's TCB extensions equal REPORTED_TCB ({tcb})")),
            );
        }
        None => {
            run.fail(Step::ChipId, "not evaluated: no trusted VEK");
            run.fail(Step::VekTcb, "not evaluated: no trusted VEK");
        }
    }

    // Minimum TCB for the product.
    match product {
        Some(p) => {
            let key = p.to_ascii_lowercase();
            match policy.snp.min_tcb.get(&key) {
                None => run.fail(
                    Step::Tcb,
                    format!("the policy has no minimum TCB for {p}: refused"),
                ),
                Some(min) => {
                    let mut low = Vec::new();
                    for (name, have, want) in [
                        ("bootloader", tcb.bootloader, min.bootloader),
                        ("tee", tcb.tee, min.tee),
                        ("snp", tcb.snp, min.snp),
                        ("microcode", tcb.microcode, min.microcode),
                    ] {
                        if have < want {
                            low.push(format!("{name} {have} < {want}"));
                        }
                    }
                    if let Some(want) = min.fmc {
                        match tcb.fmc {
                            Some(have) if have >= want => {}
                            Some(have) => low.push(format!("fmc {have} < {want}")),
                            None => low.push("fmc missing".into()),
                        }
                    }
                    if low.is_empty() {
                        run.pass(
                            Step::Tcb,
                            format!("REPORTED_TCB ({tcb}) meets the {p} minimum"),
                        );
                    } else {
                        run.fail(
                            Step::Tcb,
                            format!("REPORTED_TCB below the {p} minimum: {}", low.join(", ")),
                        );
                    }
                }
            }
        }
        None => run.fail(Step::Tcb, "not evaluated: the product is not established"),
    }

    // Guest policy and placement.
    if report.debug_allowed() && !policy.snp.allow_debug {
        run.fail(
            Step::Debug,
            "the guest policy allows debugging (bit 19): the host can read its memory",
        );
    } else if report.debug_allowed() {
        run.pass(
            Step::Debug,
            "the guest policy allows debugging, and so does this (development) policy",
        );
    } else {
        run.pass(
            Step::Debug,
            "debugging is not allowed by the guest policy (bit 19 clear)",
        );
    }
    if report.vmpl() <= policy.snp.max_vmpl {
        run.pass(
            Step::Vmpl,
            format!("VMPL {} ≤ {}", report.vmpl(), policy.snp.max_vmpl),
        );
    } else {
        run.fail(
            Step::Vmpl,
            format!(
                "VMPL {} > the policy's {}",
                report.vmpl(),
                policy.snp.max_vmpl
            ),
        );
    }
    check_measurement(
        run,
        "MEASUREMENT",
        &report.measurement(),
        &policy.snp.measurements,
        opts,
    );
    check_report_data(run, &report.report_data(), binding, opts);
}

async fn verify_tdx(
    run: &mut Run,
    ev: &Evidence,
    binding: &Binding,
    policy: &Policy,
    opts: &VerifyOptions,
) {
    hardware_dev_mode(run);
    let quote = match TdxQuote::parse(&ev.report.0) {
        Ok(q) => q,
        Err(e) => return run.fail(Step::Parse, e),
    };
    let f = quote.fields();
    run.pass(
        Step::Parse,
        format!(
            "TDX quote v{}, TD attributes {}",
            quote.version(),
            hex::encode(f.td_attributes)
        ),
    );
    run.claims.measurement = Some(hex::encode(f.mr_td));
    run.claims.rtmr = Some(f.rtmr.map(hex::encode));

    // Collateral: from the evidence, else from the PCS.
    let collateral = match &ev.collateral {
        Some(c) => Some((c.clone(), "from the evidence".to_string())),
        None => match &opts.pcs {
            Some(pcs) => match quote.fmspc_and_ca() {
                Err(e) => {
                    run.fail(Step::Collateral, e);
                    None
                }
                Ok((fmspc, ca)) => match pcs.collateral(&fmspc, ca).await {
                    Ok((c, how)) => {
                        run.fetched_collateral = Some(c.clone());
                        Some((
                            c,
                            format!(
                                "{} {} (FMSPC {}, {ca} CA)",
                                match how {
                                    Fetched::Network => "fetched from",
                                    Fetched::Cache => "cached from",
                                },
                                pcs.base_url(),
                                hex::encode(fmspc)
                            ),
                        ))
                    }
                    Err(e) => {
                        run.fail(Step::Collateral, e.to_string());
                        None
                    }
                },
            },
            None => {
                run.fail(
                    Step::Collateral,
                    "the evidence has no collateral and no PCS is configured to fetch it",
                );
                None
            }
        },
    };

    let mut status: Option<String> = None;
    match &collateral {
        Some((c, origin)) => {
            match tdx::collateral_window(c, opts.now) {
                Ok(w) => run.pass(
                    Step::Collateral,
                    format!("{origin}; valid at {}: {w}", rfc3339(opts.now)),
                ),
                Err(e) => run.fail(Step::Collateral, format!("{origin}; {e}")),
            }
            match tdx::verify_quote(&quote, c, opts.now) {
                Ok(v) => {
                    run.pass(
                        Step::Signature,
                        "quote signature, QE report, QE identity and PCK chain verify to the pinned Intel SGX root (CRLs checked)",
                    );
                    run.claims.tcb_status = Some(v.status.clone());
                    run.claims.advisory_ids = v.advisory_ids.clone();
                    status = Some(v.status);
                }
                Err((QuoteFailure::Collateral, e)) => {
                    run.fail(
                        Step::Collateral,
                        format!("{origin}; not valid at {}: {e}", rfc3339(opts.now)),
                    );
                    run.fail(
                        Step::Signature,
                        "not established: the collateral is not valid at the verification time",
                    );
                }
                Err((QuoteFailure::Tcb, e)) => {
                    // dcap-qvl matches TCB levels only after every signature verified.
                    run.pass(
                        Step::Signature,
                        "quote, QE report and PCK chain verify (dcap-qvl reached TCB matching)",
                    );
                    run.fail(Step::Tcb, format!("platform TCB not acceptable: {e}"));
                }
                Err((QuoteFailure::Signature, e)) => run.fail(Step::Signature, e),
            }
        }
        None => run.fail(Step::Signature, "not evaluated: no collateral"),
    }
    match status {
        Some(s) if s != "Revoked" && policy.tdx.accepted_tcb_status.contains(&s) => {
            run.pass(Step::Tcb, format!("TCB status {s} is accepted"))
        }
        Some(s) => run.fail(
            Step::Tcb,
            format!(
                "TCB status {s} is not in the accepted set {:?}",
                policy.tdx.accepted_tcb_status
            ),
        ),
        None => {
            if !run.checks.iter().any(|c| c.step == Step::Tcb) {
                run.fail(Step::Tcb, "not evaluated: the quote did not verify");
            }
        }
    }

    if f.debug() && !policy.tdx.allow_debug {
        run.fail(
            Step::Debug,
            "TD_ATTRIBUTES.DEBUG is set: the host can inspect the TD",
        );
    } else if f.debug() {
        run.pass(
            Step::Debug,
            "TD_ATTRIBUTES.DEBUG is set, and this (development) policy allows it",
        );
    } else {
        run.pass(Step::Debug, "TD_ATTRIBUTES.DEBUG is clear");
    }

    // MRTD and RTMRs against the reference list.
    let mrtd_hex = hex::encode(f.mr_td);
    if opts.allow_any_measurement {
        run.push(
            Step::Measurement,
            CheckStatus::Skipped,
            format!("MRTD {mrtd_hex} and RTMRs not checked: the allow-list was skipped on request (--allow-any-measurement)"),
        );
    } else {
        let matches = policy.tdx.reference.iter().any(|r| {
            r.mrtd.0 == f.mr_td
                && [&r.rtmr0, &r.rtmr1, &r.rtmr2, &r.rtmr3]
                    .iter()
                    .zip(f.rtmr.iter())
                    .all(|(want, have)| want.as_ref().is_none_or(|w| w.0 == *have))
        });
        if matches {
            run.pass(
                Step::Measurement,
                format!("MRTD {mrtd_hex} and the RTMRs match a policy reference"),
            );
        } else if policy.tdx.reference.is_empty() {
            run.fail(
                Step::Measurement,
                format!("MRTD {mrtd_hex}: the policy lists no TDX reference values"),
            );
        } else {
            run.fail(
                Step::Measurement,
                format!("MRTD {mrtd_hex} with these RTMRs matches no policy reference"),
            );
        }
    }
    check_report_data(run, &f.report_data, binding, opts);
}

fn verify_sim(
    run: &mut Run,
    ev: &Evidence,
    binding: &Binding,
    policy: &Policy,
    opts: &VerifyOptions,
) {
    if opts.dev_mode {
        run.pass(Step::DevMode, "simulated evidence, accepted because the verifier runs in development mode; it is NOT hardware");
    } else {
        run.fail(
            Step::DevMode,
            "simulated evidence is refused outside explicit development mode",
        );
    }
    let report = match SimReport::parse(&ev.report.0) {
        Ok(r) => r,
        Err(e) => return run.fail(Step::Parse, e),
    };
    run.pass(Step::Parse, "simulated report (SGLSIM01)");
    run.claims.measurement = Some(hex::encode(report.measurement));
    run.result(
        Step::Signature,
        report
            .verify(&opts.simulated_keys)
            .map(|k| format!("signed by the configured simulated-TEE key {k}")),
    );
    if policy.simulated.measurements.is_empty() && !opts.allow_any_measurement {
        run.push(
            Step::Measurement,
            CheckStatus::Skipped,
            "the policy lists no simulated measurements, so none is required",
        );
    } else {
        check_measurement(
            run,
            "simulated measurement",
            &report.measurement,
            &policy.simulated.measurements,
            opts,
        );
    }
    check_report_data(run, &report.report_data, binding, opts);
}
