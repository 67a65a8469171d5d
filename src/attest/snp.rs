//! AMD SEV-SNP: the ATTESTATION_REPORT (SEV-SNP ABI spec, Table 22), the
//! GUID certificate table the firmware hands out with it, the chain
//! ARK → ASK/ASVK → VCEK/VLEK, and the report signature.
//!
//! The report is parsed with the `sev` crate for its typed fields, and read
//! directly at the spec's offsets for what the verifier decides on. The
//! signature is checked over the raw bytes `[0x000, 0x2A0)`, never over a
//! re-encoding, and the bytes the signature does not cover (the unused tail of
//! R and S and the reserved area after them) must be zero, so that flipping
//! any byte of a report makes it fail.

use der::{Decode, Encode};
use p384::ecdsa::signature::Verifier;
use sev::certs::snp::Verifiable;
use sev::parser::ByteParser;
use x509_cert::Certificate;

use super::roots::{common_name, AmdProduct};

/// The report is exactly this long.
pub const REPORT_LEN: usize = 1184;
/// The signed part of the report.
pub const SIGNED_LEN: usize = 0x2A0;
const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
const SIG_FIELD: usize = 72;
const SIG_END: usize = 0x330;

/// A TCB version as the verifier uses it (the `sev` crate's field split, which
/// depends on the product generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcb {
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc {fmc}, ")?;
        }
        write!(
            f,
            "bootloader {}, tee {}, snp {}, microcode {}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

impl From<sev::firmware::host::TcbVersion> for Tcb {
    fn from(t: sev::firmware::host::TcbVersion) -> Self {
        Tcb {
            fmc: t.fmc,
            bootloader: t.bootloader,
            tee: t.tee,
            snp: t.snp,
            microcode: t.microcode,
        }
    }
}

/// A parsed SEV-SNP report, with its raw bytes.
#[derive(Clone)]
pub struct SnpReport {
    raw: Vec<u8>,
    parsed: sev::firmware::guest::AttestationReport,
}

impl std::fmt::Debug for SnpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SnpReport(version {}, vmpl {})",
            self.version(),
            self.vmpl()
        )
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl SnpReport {
    /// Parse a report: exactly 1184 bytes, ECDSA P-384 signature algorithm,
    /// zero in every byte the signature does not cover.
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.len() != REPORT_LEN {
            return Err(format!(
                "report is {} bytes, expected {REPORT_LEN}",
                raw.len()
            ));
        }
        let version = u32_at(raw, 0);
        if !(2..=5).contains(&version) {
            return Err(format!("report version {version} is not supported (2..=5)"));
        }
        let algo = u32_at(raw, 0x34);
        if algo != 1 {
            return Err(format!(
                "signature algorithm {algo} (only 1, ECDSA P-384 with SHA-384, exists)"
            ));
        }
        // R and S are 72-byte little-endian fields holding 48-byte values.
        let unsigned_tail = raw[SIG_R + 48..SIG_R + SIG_FIELD]
            .iter()
            .chain(&raw[SIG_S + 48..SIG_S + SIG_FIELD])
            .chain(&raw[SIG_END..]);
        if unsigned_tail.into_iter().any(|b| *b != 0) {
            return Err("bytes outside the signed area and the signature are not zero".into());
        }
        let parsed = sev::firmware::guest::AttestationReport::from_bytes(raw)
            .map_err(|e| format!("not an SEV-SNP report: {e}"))?;
        Ok(SnpReport {
            raw: raw.to_vec(),
            parsed,
        })
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }
    pub fn version(&self) -> u32 {
        u32_at(&self.raw, 0)
    }
    /// The guest policy (offset 0x08).
    pub fn guest_policy(&self) -> u64 {
        u64_at(&self.raw, 0x08)
    }
    /// Guest policy bit 19: debugging allowed.
    pub fn debug_allowed(&self) -> bool {
        self.guest_policy() & (1 << 19) != 0
    }
    pub fn vmpl(&self) -> u32 {
        u32_at(&self.raw, 0x30)
    }
    /// KEY_INFO bits 4:2 (SIGNING_KEY): 0 = VCEK, 1 = VLEK, 7 = none.
    pub fn signing_key(&self) -> u32 {
        (u32_at(&self.raw, 0x48) >> 2) & 0x7
    }
    pub fn report_data(&self) -> [u8; 64] {
        let mut a = [0u8; 64];
        a.copy_from_slice(&self.raw[0x50..0x90]);
        a
    }
    pub fn measurement(&self) -> [u8; 48] {
        let mut a = [0u8; 48];
        a.copy_from_slice(&self.raw[0x90..0xC0]);
        a
    }
    pub fn chip_id(&self) -> [u8; 64] {
        let mut a = [0u8; 64];
        a.copy_from_slice(&self.raw[0x1A0..0x1E0]);
        a
    }
    pub fn reported_tcb(&self) -> Tcb {
        self.parsed.reported_tcb.into()
    }
    /// CPUID family and model (report version 3 and later).
    pub fn cpuid(&self) -> Option<(u8, u8)> {
        (self.version() >= 3).then(|| (self.raw[0x188], self.raw[0x189]))
    }

    /// The products this report may come from, most likely first: from CPUID
    /// when the report has it, otherwise from the shape of the chip id
    /// (Turin's hwID is 8 bytes, the rest zero).
    pub fn candidate_products(&self) -> Vec<&'static str> {
        match self.cpuid() {
            Some((0x19, m)) if m < 0x10 => vec!["Milan"],
            Some((0x19, m)) if (0x10..0x20).contains(&m) || (0xA0..0xB0).contains(&m) => {
                vec!["Genoa"]
            }
            Some((0x1A, _)) => vec!["Turin"],
            _ if self.chip_id()[8..].iter().all(|b| *b == 0) => vec!["Turin"],
            _ => vec!["Milan", "Genoa"],
        }
    }

    /// ECDSA P-384/SHA-384 over `[0x000, 0x2A0)` under `vek`'s public key.
    pub fn verify_signature(&self, vek: &Certificate) -> Result<(), String> {
        let spki = vek
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .as_bytes()
            .ok_or("the VEK public key is not a whole number of bytes")?;
        let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(spki)
            .map_err(|_| "the VEK key is not a P-384 public key".to_string())?;
        let mut r = [0u8; 48];
        let mut s = [0u8; 48];
        for i in 0..48 {
            r[i] = self.raw[SIG_R + 47 - i];
            s[i] = self.raw[SIG_S + 47 - i];
        }
        let sig = p384::ecdsa::Signature::from_scalars(r, s)
            .map_err(|_| "R or S is not a valid P-384 scalar".to_string())?;
        key.verify(&self.raw[..SIGNED_LEN], &sig)
            .map_err(|_| "the report signature does not verify under the VEK".to_string())
    }
}

/// The kind of endorsement key that signed a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VekKind {
    Vcek,
    Vlek,
}

impl VekKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        }
    }
}

/// The outcome of the chain step.
#[derive(Debug, Clone)]
pub struct VerifiedChain {
    pub product: &'static str,
    pub kind: VekKind,
    pub vek: Certificate,
    /// What the chain was, for the verdict.
    pub detail: String,
}

/// Verify VEK ← intermediate ← pinned ARK at `now` (unix seconds). The
/// intermediate is the evidence's `ask` when it is signed by a pinned ARK
/// (that is how a VLEK's ASVK arrives), else the built-in ASK. `ark`, when the
/// evidence carries one, must equal the pinned root byte for byte.
pub fn verify_chain(
    vek_der: &[u8],
    ask_der: Option<&[u8]>,
    ark_der: Option<&[u8]>,
    products: &[AmdProduct],
    now: u64,
) -> Result<VerifiedChain, String> {
    let vek = super::roots::parse_der_cert(vek_der).map_err(|e| format!("VEK: {e}"))?;
    let evidence_ask = match ask_der {
        Some(d) => Some(super::roots::parse_der_cert(d).map_err(|e| format!("ASK: {e}"))?),
        None => None,
    };
    let issuer = &vek.tbs_certificate.issuer;
    for p in products {
        let mut candidates: Vec<(&Certificate, &str)> = Vec::new();
        if let Some(a) = &evidence_ask {
            if a.tbs_certificate.issuer == p.ark.tbs_certificate.subject {
                candidates.push((a, "from the evidence"));
            }
        }
        candidates.push((&p.ask, "built in"));
        let Some((inter, origin)) = candidates
            .into_iter()
            .find(|(c, _)| &c.tbs_certificate.subject == issuer)
        else {
            continue;
        };
        if let Some(ark) = ark_der {
            if ark != p.ark_der.as_slice() {
                return Err(format!(
                    "certs.ark is not the pinned AMD root ARK-{} (a root is never taken from evidence)",
                    p.name
                ));
            }
        }
        let chain = sev::certs::snp::Chain {
            ca: sev::certs::snp::ca::Chain {
                ark: p.ark.clone().into(),
                ask: inter.clone().into(),
            },
            vek: vek.clone().into(),
        };
        (&chain).verify().map_err(|e| {
            format!(
                "{} ← {} ({origin}) ← pinned ARK-{}: {e}",
                common_name(&vek.tbs_certificate.subject),
                common_name(&inter.tbs_certificate.subject),
                p.name
            )
        })?;
        for (what, c) in [("VEK", &vek), ("intermediate", inter), ("ARK", &p.ark)] {
            check_validity(what, c, now)?;
        }
        let inter_cn = common_name(&inter.tbs_certificate.subject);
        let kind = if inter_cn.contains("VLEK") {
            VekKind::Vlek
        } else {
            VekKind::Vcek
        };
        return Ok(VerifiedChain {
            product: p.name,
            kind,
            detail: format!(
                "{} {} ← {inter_cn} ({origin}) ← ARK-{} (pinned); all valid at {}",
                kind.as_str(),
                common_name(&vek.tbs_certificate.subject),
                p.name,
                crate::timefmt::format_rfc3339(now)
            ),
            vek,
        });
    }
    Err(format!(
        "the VEK's issuer {:?} is not an AMD ASK/ASVK under a pinned root (Milan, Genoa, Turin)",
        issuer.to_string()
    ))
}

fn check_validity(what: &str, c: &Certificate, now: u64) -> Result<(), String> {
    let v = &c.tbs_certificate.validity;
    let nb = v.not_before.to_unix_duration().as_secs();
    let na = v.not_after.to_unix_duration().as_secs();
    if now < nb || now > na {
        return Err(format!(
            "the {what} certificate is valid {} to {}, not at {}",
            crate::timefmt::format_rfc3339(nb),
            crate::timefmt::format_rfc3339(na),
            crate::timefmt::format_rfc3339(now)
        ));
    }
    Ok(())
}

/// The AMD extensions of a VCEK/VLEK (VCEK spec, Table 8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VekExtensions {
    pub bootloader: Option<u8>,
    pub tee: Option<u8>,
    pub snp: Option<u8>,
    pub microcode: Option<u8>,
    pub fmc: Option<u8>,
    pub hw_id: Option<Vec<u8>>,
    pub product_name: Option<String>,
}

const OID_BL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";
const OID_PRODUCT: &str = "1.3.6.1.4.1.3704.1.2";

fn ext_u8(v: &[u8]) -> Option<u8> {
    // The SPL extensions are DER INTEGERs.
    let i = der::asn1::Int::from_der(v).ok()?;
    let b = i.as_bytes();
    match b {
        [x] => Some(*x),
        [0, x] => Some(*x),
        _ => None,
    }
}

pub fn vek_extensions(cert: &Certificate) -> VekExtensions {
    let mut out = VekExtensions::default();
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        let v = ext.extn_value.as_bytes();
        match ext.extn_id.to_string().as_str() {
            OID_BL => out.bootloader = ext_u8(v),
            OID_TEE => out.tee = ext_u8(v),
            OID_SNP => out.snp = ext_u8(v),
            OID_UCODE => out.microcode = ext_u8(v),
            OID_FMC => out.fmc = ext_u8(v),
            OID_HWID => {
                // AMD encodes hwID as the raw bytes; accept a wrapped OCTET
                // STRING too.
                let inner = der::asn1::OctetString::from_der(v)
                    .ok()
                    .map(|o| o.as_bytes().to_vec());
                out.hw_id = Some(match inner {
                    Some(i) if i.len() == 64 || i.len() == 8 => i,
                    _ => v.to_vec(),
                });
            }
            OID_PRODUCT => {
                out.product_name = der::asn1::Ia5StringRef::from_der(v)
                    .ok()
                    .map(|s| s.as_str().to_string())
                    .or_else(|| std::str::from_utf8(v).ok().map(str::to_string));
            }
            _ => {}
        }
    }
    out
}

/// Compare the VEK's hwID with the report's chip id. Turin's hwID is the
/// first 8 bytes of CHIP_ID; earlier products use all 64.
pub fn hw_id_matches(ext: &VekExtensions, chip_id: &[u8; 64]) -> Result<(), String> {
    let Some(hw) = &ext.hw_id else {
        return Err("the VEK has no hwID extension (1.3.6.1.4.1.3704.1.4)".into());
    };
    let ok = match hw.len() {
        64 => hw.as_slice() == chip_id.as_slice(),
        8 => hw.as_slice() == &chip_id[..8] && chip_id[8..].iter().all(|b| *b == 0),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the VEK's hwID {} is not the report's CHIP_ID {}",
            hex::encode(hw),
            hex::encode(chip_id)
        ))
    }
}

/// The VEK's TCB extensions must equal the report's REPORTED_TCB.
pub fn tcb_matches(ext: &VekExtensions, tcb: &Tcb) -> Result<(), String> {
    let fields = [
        ("blSPL", ext.bootloader, Some(tcb.bootloader)),
        ("teeSPL", ext.tee, Some(tcb.tee)),
        ("snpSPL", ext.snp, Some(tcb.snp)),
        ("ucodeSPL", ext.microcode, Some(tcb.microcode)),
    ];
    for (name, cert, rep) in fields {
        if cert != rep {
            return Err(format!(
                "VEK {name} {} differs from REPORTED_TCB {}",
                cert.map_or("missing".into(), |v| v.to_string()),
                rep.map_or("-".into(), |v| v.to_string())
            ));
        }
    }
    if tcb.fmc.is_some() && ext.fmc != tcb.fmc {
        return Err(format!(
            "VEK fmcSPL {:?} differs from REPORTED_TCB fmc {:?}",
            ext.fmc, tcb.fmc
        ));
    }
    Ok(())
}

/// A certificate from the firmware's GUID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCert {
    pub guid: [u8; 16],
    pub data: Vec<u8>,
}

/// GUIDs of the certificate table (GHCB spec, table "Certificate table GUIDs").
pub const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";
pub const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
pub const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
pub const GUID_VLEK: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";

/// The largest certificate table read.
pub const MAX_CERT_TABLE: usize = 64 * 1024;

/// Parse the certificate table (configfs-tsm `auxblob`, or the extended
/// report's certificate buffer): entries of GUID(16) ‖ offset(u32 LE) ‖
/// length(u32 LE), ended by an all-zero entry; offsets index the whole blob.
pub fn parse_cert_table(blob: &[u8]) -> Result<Vec<TableCert>, String> {
    if blob.len() > MAX_CERT_TABLE {
        return Err(format!("certificate table is {} bytes", blob.len()));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let entry = blob
            .get(pos..pos + 24)
            .ok_or("certificate table ends without its terminating entry")?;
        if entry.iter().all(|b| *b == 0) {
            return Ok(out);
        }
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&entry[..16]);
        let off = u32_at(entry, 16) as usize;
        let len = u32_at(entry, 20) as usize;
        let end = off.checked_add(len).ok_or("certificate entry overflows")?;
        let data = blob
            .get(off..end)
            .ok_or("certificate entry points outside the table")?;
        out.push(TableCert {
            guid,
            data: data.to_vec(),
        });
        pos += 24;
        if out.len() > 64 {
            return Err("certificate table has too many entries".into());
        }
    }
}

/// The table's GUID bytes of a textual UUID. Host tools write them in RFC
/// 4122 byte order (the order the `sev` crate reads too).
pub fn guid_bytes(text: &str) -> [u8; 16] {
    let u = uuid::Uuid::parse_str(text).unwrap_or_default();
    *u.as_bytes()
}

/// Map a certificate table onto the evidence's `certs`.
pub fn certs_from_table(table: &[TableCert]) -> super::SnpCerts {
    use super::evidence::B64Bytes;
    let find = |g: &str| {
        let want = guid_bytes(g);
        table
            .iter()
            .find(|c| c.guid == want && !c.data.is_empty())
            .map(|c| B64Bytes(trim_der(&c.data).to_vec()))
    };
    super::SnpCerts {
        vcek: find(GUID_VCEK),
        vlek: find(GUID_VLEK),
        ask: find(GUID_ASK),
        ark: find(GUID_ARK),
    }
}

/// Certificates in the table may be padded; keep the DER object only.
fn trim_der(data: &[u8]) -> &[u8] {
    let total = der::SliceReader::new(data)
        .ok()
        .and_then(|mut r| der::Header::decode(&mut r).ok())
        .and_then(|h| h.encoded_len().ok().and_then(|hl| (hl + h.length).ok()))
        .and_then(|l| usize::try_from(l).ok());
    match total {
        Some(t) if t <= data.len() => &data[..t],
        _ => data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_table_parse_and_refusals() {
        let vcek = vec![0x30, 0x03, 1, 2, 3, 0, 0];
        let mut blob = Vec::new();
        blob.extend_from_slice(&guid_bytes(GUID_VCEK));
        blob.extend_from_slice(&48u32.to_le_bytes());
        blob.extend_from_slice(&(vcek.len() as u32).to_le_bytes());
        blob.extend_from_slice(&[0u8; 24]);
        blob.extend_from_slice(&vcek);
        let t = parse_cert_table(&blob).unwrap();
        assert_eq!(t.len(), 1);
        let certs = certs_from_table(&t);
        assert_eq!(certs.vcek.unwrap().0, vec![0x30, 0x03, 1, 2, 3]);
        assert!(parse_cert_table(&blob[..30]).is_err());
        let mut bad = blob.clone();
        bad[16] = 200;
        assert!(parse_cert_table(&bad).is_err());
    }
}
