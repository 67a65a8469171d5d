//! The AMD KDS and Intel PCS clients against loopback servers that speak the
//! vendors' APIs and serve the real sample certificates and collateral
//! (tests/data/tee/). The verifier fetches what the evidence lacks once, and
//! then answers from its disk cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sgl::attest::evidence::B64Bytes;
use sgl::attest::kds::KdsClient;
use sgl::attest::pcs::PcsClient;
use sgl::attest::policy::{Measurement, TdxReference};
use sgl::attest::{
    verify_evidence, Binding, CheckStatus, Evidence, EvidenceFormat, Policy, Step, VerifyOptions,
};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tee");
const NOW_2025: u64 = 1_751_328_000;

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DATA}/{name}")).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&read("expected.json")).unwrap()
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

// ---- AMD KDS ----

#[derive(Clone)]
struct Kds {
    hits: Arc<AtomicUsize>,
    chip_id: String,
    vcek: Arc<Vec<u8>>,
}

/// `GET /vcek/v1/{product}/{hwid}?blSPL&teeSPL&snpSPL&ucodeSPL` as KDS
/// answers it: the DER VCEK, or 404 for an unknown chip or TCB.
async fn kds_vcek(
    State(s): State<Kds>,
    Path((product, hwid)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let tcb_ok = q.get("blSPL").map(String::as_str) == Some("3")
        && q.get("teeSPL").map(String::as_str) == Some("0")
        && q.get("snpSPL").map(String::as_str) == Some("8")
        && q.get("ucodeSPL").map(String::as_str) == Some("115");
    if product == "Milan" && hwid == s.chip_id && tcb_ok {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/x-x509-ca-cert"),
        );
        (h, s.vcek.as_ref().clone()).into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

#[tokio::test]
async fn kds_serves_the_vcek_once_then_the_cache_answers() {
    let e = expected();
    let chip_id = e["snp_milan"]["chip_id_hex"].as_str().unwrap().to_string();
    let state = Kds {
        hits: Arc::new(AtomicUsize::new(0)),
        chip_id,
        vcek: Arc::new(read("vcek_milan.der")),
    };
    let hits = state.hits.clone();
    let base = serve(
        Router::new()
            .route("/vcek/v1/{product}/{hwid}", get(kds_vcek))
            .with_state(state),
    )
    .await;
    let cache = tempfile::tempdir().unwrap();

    let report = hex::decode(String::from_utf8(read("report_milan.hex")).unwrap().trim()).unwrap();
    let ev = Evidence {
        format: EvidenceFormat::SevSnp,
        report: B64Bytes(report),
        certs: None,
        collateral: None,
        gpu: Vec::new(),
    };
    let rd: [u8; 64] = hex::decode(e["snp_milan"]["report_data_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let mut policy = Policy::default_policy();
    policy.snp.measurements =
        vec![Measurement::from_hex(e["snp_milan"]["measurement_hex"].as_str().unwrap()).unwrap()];
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.kds = Some(KdsClient::new(&base, Some(cache.path().to_path_buf())));

    let v = verify_evidence(&ev, &Binding::ReportData(rd), &policy, &opts).await;
    assert!(v.verified, "{}", v.render());
    assert!(v
        .check(Step::Certificates)
        .unwrap()
        .detail
        .contains("fetched from AMD KDS"));
    assert_eq!(
        v.fetched_certs.as_ref().unwrap().vcek.as_ref().unwrap().0,
        read("vcek_milan.der")
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let v = verify_evidence(&ev, &Binding::ReportData(rd), &policy, &opts).await;
    assert!(v.verified, "{}", v.render());
    assert!(v
        .check(Step::Certificates)
        .unwrap()
        .detail
        .contains("from the KDS cache"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the second verification must use the cache"
    );

    // A KDS without this chip: the certificates step fails, nothing passes by accident.
    let empty = serve(Router::new()).await;
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.kds = Some(KdsClient::new(&empty, None));
    let v = verify_evidence(&ev, &Binding::ReportData(rd), &policy, &opts).await;
    assert_eq!(
        v.status(Step::Certificates),
        Some(CheckStatus::Fail),
        "{}",
        v.render()
    );
    assert!(!v.verified);
}

// ---- Intel PCS ----

#[derive(Clone)]
struct Pcs {
    hits: Arc<AtomicUsize>,
    coll: Arc<serde_json::Value>,
    fmspc: Arc<std::sync::Mutex<Option<String>>>,
}

fn s(v: &serde_json::Value, k: &str) -> String {
    v[k].as_str().unwrap().to_string()
}

/// PCS puts the issuer chains in headers, URL-encoded.
fn chain_header(pem: &str) -> HeaderValue {
    let mut out = String::new();
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap()
}

async fn pcs_pckcrl(State(st): State<Pcs>, Query(q): Query<HashMap<String, String>>) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    if q.get("encoding").map(String::as_str) != Some("der")
        || !matches!(
            q.get("ca").map(String::as_str),
            Some("processor" | "platform")
        )
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut h = HeaderMap::new();
    h.insert(
        "SGX-PCK-CRL-Issuer-Chain",
        chain_header(&s(&st.coll, "pck_crl_issuer_chain")),
    );
    (h, hex::decode(s(&st.coll, "pck_crl")).unwrap()).into_response()
}

async fn pcs_tcb(State(st): State<Pcs>, Query(q): Query<HashMap<String, String>>) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    *st.fmspc.lock().unwrap() = q.get("fmspc").cloned();
    let body = format!(
        "{{\"tcbInfo\":{},\"signature\":\"{}\"}}",
        s(&st.coll, "tcb_info"),
        s(&st.coll, "tcb_info_signature")
    );
    let mut h = HeaderMap::new();
    h.insert(
        "TCB-Info-Issuer-Chain",
        chain_header(&s(&st.coll, "tcb_info_issuer_chain")),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    (h, body).into_response()
}

async fn pcs_qe(State(st): State<Pcs>) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let body = format!(
        "{{\"enclaveIdentity\":{},\"signature\":\"{}\"}}",
        s(&st.coll, "qe_identity"),
        s(&st.coll, "qe_identity_signature")
    );
    let mut h = HeaderMap::new();
    h.insert(
        "SGX-Enclave-Identity-Issuer-Chain",
        chain_header(&s(&st.coll, "qe_identity_issuer_chain")),
    );
    (h, body).into_response()
}

async fn root_crl(State(st): State<Pcs>) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    hex::decode(s(&st.coll, "root_ca_crl"))
        .unwrap()
        .into_response()
}

#[tokio::test]
async fn pcs_serves_the_collateral_once_then_the_cache_answers() {
    let coll: serde_json::Value =
        serde_json::from_slice(&read("tdx_quote_collateral.json")).unwrap();
    let state = Pcs {
        hits: Arc::new(AtomicUsize::new(0)),
        coll: Arc::new(coll),
        fmspc: Arc::new(std::sync::Mutex::new(None)),
    };
    let hits = state.hits.clone();
    let fmspc = state.fmspc.clone();
    let base = serve(
        Router::new()
            .route("/sgx/certification/v4/pckcrl", get(pcs_pckcrl))
            .route("/tdx/certification/v4/tcb", get(pcs_tcb))
            .route("/tdx/certification/v4/qe/identity", get(pcs_qe))
            .route("/IntelSGXRootCA.der", get(root_crl))
            .with_state(state),
    )
    .await;
    let cache = tempfile::tempdir().unwrap();

    let t = expected()["tdx"][0].clone();
    assert_eq!(t["file"], "tdx_quote");
    let m = |k: &str| Measurement::from_hex(t[k].as_str().unwrap()).unwrap();
    let mut policy = Policy::default_policy();
    policy.tdx.reference = vec![TdxReference {
        mrtd: m("mr_td_hex"),
        rtmr0: Some(m("rtmr0_hex")),
        rtmr1: Some(m("rtmr1_hex")),
        rtmr2: Some(m("rtmr2_hex")),
        rtmr3: Some(m("rtmr3_hex")),
    }];
    let rd: [u8; 64] = hex::decode(t["report_data_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let ev = Evidence {
        format: EvidenceFormat::Tdx,
        report: B64Bytes(read("tdx_quote")),
        certs: None,
        collateral: None,
        gpu: Vec::new(),
    };
    let mut opts = VerifyOptions::new(NOW_2025);
    opts.pcs = Some(PcsClient::new(
        &base,
        &format!("{base}/IntelSGXRootCA.der"),
        Some(cache.path().to_path_buf()),
    ));

    let v = verify_evidence(&ev, &Binding::ReportData(rd), &policy, &opts).await;
    assert!(v.verified, "{}", v.render());
    assert!(v
        .check(Step::Collateral)
        .unwrap()
        .detail
        .contains("fetched from"));
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    // The FMSPC the client asked for is the one in the quote's PCK certificate.
    assert_eq!(fmspc.lock().unwrap().as_deref().map(str::len), Some(12));
    // What was fetched is exactly the sample collateral, so a coordinator can
    // publish it with the evidence (§7b).
    let fetched = v.fetched_collateral.clone().unwrap();
    let sample: dcap_qvl::QuoteCollateralV3 =
        serde_json::from_slice(&read("tdx_quote_collateral.json")).unwrap();
    assert_eq!(fetched, sample);

    let v = verify_evidence(&ev, &Binding::ReportData(rd), &policy, &opts).await;
    assert!(v.verified, "{}", v.render());
    assert!(v
        .check(Step::Collateral)
        .unwrap()
        .detail
        .contains("cached from"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        4,
        "the second verification must use the cache"
    );
}
