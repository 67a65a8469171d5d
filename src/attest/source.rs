//! Evidence sources behind one trait:
//!
//! - SEV-SNP through the kernel's configfs-tsm interface (Linux ≥ 6.7):
//!   create `/sys/kernel/config/tsm/report/<name>`, write 64 bytes to
//!   `inblob`, read the report from `outblob` and the certificate table from
//!   `auxblob`, check `generation` to detect a concurrent writer, remove the
//!   entry;
//! - SEV-SNP through `/dev/sev-guest` (the `sev` crate's extended report
//!   ioctl) where configfs-tsm is missing;
//! - TDX through configfs-tsm (the kernel asks the quoting service);
//!   `/dev/tdx_guest` alone yields only a TDREPORT that needs a quoting
//!   enclave to become a quote, so it is detected and explained, not used;
//! - simulated: a locally generated key, same envelope, never hardware.
//!
//! [`detect`] says which are available and why the others are not.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::evidence::{B64Bytes, Evidence, EvidenceFormat};
use super::sim::{self, SimKey};
use super::{snp, AttestError};

pub const DEFAULT_CONFIGFS_TSM: &str = "/sys/kernel/config/tsm/report";
pub const DEFAULT_SEV_GUEST: &str = "/dev/sev-guest";
pub const DEFAULT_TDX_GUEST: &str = "/dev/tdx_guest";

/// The largest outblob/auxblob read from configfs.
const MAX_BLOB: u64 = 64 * 1024;

/// Which source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    SnpConfigfsTsm,
    SnpSevGuest,
    TdxConfigfsTsm,
    TdxGuestDevice,
    Simulated,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::SnpConfigfsTsm => "sev-snp (configfs-tsm)",
            SourceKind::SnpSevGuest => "sev-snp (/dev/sev-guest)",
            SourceKind::TdxConfigfsTsm => "tdx (configfs-tsm)",
            SourceKind::TdxGuestDevice => "tdx (/dev/tdx_guest)",
            SourceKind::Simulated => "simulated",
        }
    }
}

/// Something that turns 64 bytes of report data into evidence.
pub trait EvidenceSource: Send + Sync {
    fn kind(&self) -> SourceKind;
    fn format(&self) -> EvidenceFormat;
    /// Blocking: it talks to the kernel or reads files.
    fn collect(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError>;
}

/// Where to look; the defaults are the kernel's paths.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub configfs_tsm: PathBuf,
    pub sev_guest: PathBuf,
    pub tdx_guest: PathBuf,
    /// The simulated-TEE key file; `None` means simulated evidence is not
    /// offered (production).
    pub simulated_key: Option<PathBuf>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            configfs_tsm: DEFAULT_CONFIGFS_TSM.into(),
            sev_guest: DEFAULT_SEV_GUEST.into(),
            tdx_guest: DEFAULT_TDX_GUEST.into(),
            simulated_key: None,
        }
    }
}

/// One line of `sgl attest detect`.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    pub source: SourceKind,
    pub available: bool,
    pub reason: String,
}

/// The configfs-tsm provider behind the report directory: `sev_guest` or
/// `tdx_guest`, found by creating (and removing) a probe entry.
fn configfs_provider(root: &Path) -> Result<String, String> {
    if !root.is_dir() {
        return Err(format!(
            "{} does not exist (needs Linux ≥ 6.7 with configfs mounted and a TSM guest driver)",
            root.display()
        ));
    }
    let entry = TsmEntry::create(root).map_err(|e| format!("cannot create a report entry: {e}"))?;
    let p = std::fs::read_to_string(entry.path.join("provider"))
        .map_err(|e| format!("cannot read the provider: {e}"))?;
    Ok(p.trim().to_string())
}

/// A configfs-tsm report entry, removed on drop.
struct TsmEntry {
    path: PathBuf,
}

impl TsmEntry {
    fn create(root: &Path) -> std::io::Result<Self> {
        let mut rnd = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut rnd);
        let path = root.join(format!("sgl-{}-{}", std::process::id(), hex::encode(rnd)));
        std::fs::create_dir(&path)?;
        Ok(TsmEntry { path })
    }

    fn read_capped(&self, name: &str) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        std::fs::File::open(self.path.join(name))?
            .take(MAX_BLOB + 1)
            .read_to_end(&mut out)?;
        if out.len() as u64 > MAX_BLOB {
            return Err(std::io::Error::other(format!(
                "{name} is larger than {MAX_BLOB} bytes"
            )));
        }
        Ok(out)
    }

    fn generation(&self) -> std::io::Result<u64> {
        let g = std::fs::read_to_string(self.path.join("generation"))?;
        g.trim().parse().map_err(std::io::Error::other)
    }

    /// Write the report data and read back (outblob, auxblob).
    fn report(
        &self,
        report_data: &[u8; 64],
        want_aux: bool,
    ) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        let before = self.generation()?;
        std::fs::write(self.path.join("inblob"), report_data)?;
        let out = self.read_capped("outblob")?;
        let aux = if want_aux {
            // An empty or missing auxblob just means the host supplied no certificates.
            self.read_capped("auxblob").unwrap_or_default()
        } else {
            Vec::new()
        };
        // Our single write bumps the generation once; anything else means
        // another writer changed the request under us.
        if self.generation()? != before + 1 {
            return Err(std::io::Error::other(
                "the configfs-tsm entry was written concurrently; the report may not carry our data",
            ));
        }
        Ok((out, aux))
    }
}

impl Drop for TsmEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// SEV-SNP through configfs-tsm.
#[derive(Debug, Clone)]
pub struct SnpConfigfs {
    pub root: PathBuf,
}

impl EvidenceSource for SnpConfigfs {
    fn kind(&self) -> SourceKind {
        SourceKind::SnpConfigfsTsm
    }
    fn format(&self) -> EvidenceFormat {
        EvidenceFormat::SevSnp
    }
    fn collect(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let err = |d: String| AttestError::Source {
            source_name: "sev-snp configfs-tsm",
            detail: d,
        };
        let entry = TsmEntry::create(&self.root).map_err(|e| err(e.to_string()))?;
        let (report, aux) = entry
            .report(report_data, true)
            .map_err(|e| err(e.to_string()))?;
        snp_evidence(report, &aux).map_err(err)
    }
}

fn snp_evidence(report: Vec<u8>, cert_table: &[u8]) -> Result<Evidence, String> {
    if report.len() != snp::REPORT_LEN {
        return Err(format!("the report is {} bytes", report.len()));
    }
    let certs = if cert_table.is_empty() {
        None
    } else {
        let table = snp::parse_cert_table(cert_table)?;
        let mut c = snp::certs_from_table(&table);
        // The host's ARK is only ever compared with the pinned one; keep it
        // so a verifier can show a mismatch.
        if c.vcek.is_none() && c.vlek.is_none() {
            c = Default::default();
        }
        (!c.is_empty()).then_some(c)
    };
    Ok(Evidence {
        format: EvidenceFormat::SevSnp,
        report: B64Bytes(report),
        certs,
        collateral: None,
        gpu: Vec::new(),
    })
}

/// SEV-SNP through `/dev/sev-guest`.
#[derive(Debug, Clone)]
pub struct SnpSevGuest {
    pub device: PathBuf,
}

impl EvidenceSource for SnpSevGuest {
    fn kind(&self) -> SourceKind {
        SourceKind::SnpSevGuest
    }
    fn format(&self) -> EvidenceFormat {
        EvidenceFormat::SevSnp
    }
    fn collect(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let err = |d: String| AttestError::Source {
            source_name: "sev-snp /dev/sev-guest",
            detail: d,
        };
        if self.device != Path::new(DEFAULT_SEV_GUEST) {
            return Err(err("the sev crate opens /dev/sev-guest only".into()));
        }
        let mut fw = sev::firmware::guest::Firmware::open().map_err(|e| err(e.to_string()))?;
        let (report, certs) = fw
            .get_ext_report(None, Some(*report_data), Some(0))
            .map_err(|e| err(e.to_string()))?;
        let mut ev = snp_evidence(report, &[]).map_err(err)?;
        if let Some(entries) = certs {
            use sev::firmware::host::CertType;
            let mut c = super::SnpCerts::default();
            for e in entries {
                let slot = match e.cert_type {
                    CertType::VCEK => &mut c.vcek,
                    CertType::VLEK => &mut c.vlek,
                    CertType::ASK => &mut c.ask,
                    CertType::ARK => &mut c.ark,
                    _ => continue,
                };
                if !e.data.is_empty() {
                    *slot = Some(B64Bytes(e.data));
                }
            }
            if c.vcek.is_some() || c.vlek.is_some() {
                ev.certs = Some(c);
            }
        }
        Ok(ev)
    }
}

/// TDX through configfs-tsm.
#[derive(Debug, Clone)]
pub struct TdxConfigfs {
    pub root: PathBuf,
}

impl EvidenceSource for TdxConfigfs {
    fn kind(&self) -> SourceKind {
        SourceKind::TdxConfigfsTsm
    }
    fn format(&self) -> EvidenceFormat {
        EvidenceFormat::Tdx
    }
    fn collect(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let err = |d: String| AttestError::Source {
            source_name: "tdx configfs-tsm",
            detail: d,
        };
        let entry = TsmEntry::create(&self.root).map_err(|e| err(e.to_string()))?;
        let (quote, _) = entry
            .report(report_data, false)
            .map_err(|e| err(e.to_string()))?;
        super::tdx::TdxQuote::parse(&quote).map_err(|e| err(format!("the kernel returned {e}")))?;
        Ok(Evidence {
            format: EvidenceFormat::Tdx,
            report: B64Bytes(quote),
            certs: None,
            collateral: None,
            gpu: Vec::new(),
        })
    }
}

/// Simulated evidence, signed by the key in `key_file`.
#[derive(Debug)]
pub struct Simulated {
    key: SimKey,
}

impl Simulated {
    /// Load (or create, 0600) the simulated-TEE key.
    pub fn open(key_file: &Path) -> Result<Self, AttestError> {
        Ok(Simulated {
            key: SimKey::load_or_create(key_file)?,
        })
    }

    pub fn public_key(&self) -> crate::proto::identity::Ed25519Public {
        self.key.public()
    }
}

impl EvidenceSource for Simulated {
    fn kind(&self) -> SourceKind {
        SourceKind::Simulated
    }
    fn format(&self) -> EvidenceFormat {
        EvidenceFormat::Simulated
    }
    fn collect(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        Ok(Evidence {
            format: EvidenceFormat::Simulated,
            report: B64Bytes(self.key.report(report_data, &sim::self_measurement())),
            certs: None,
            collateral: None,
            gpu: Vec::new(),
        })
    }
}

/// Which sources this machine has, and why the others are missing.
pub fn detect(cfg: &SourceConfig) -> Vec<Detection> {
    let mut out = Vec::new();
    let provider = configfs_provider(&cfg.configfs_tsm);
    let (snp_cfg, tdx_cfg) = match &provider {
        Ok(p) if p == "sev_guest" => (
            Ok(()),
            Err(format!("configfs-tsm provider is {p}, not tdx_guest")),
        ),
        Ok(p) if p == "tdx_guest" => (
            Err(format!("configfs-tsm provider is {p}, not sev_guest")),
            Ok(()),
        ),
        Ok(p) => (
            Err(format!("configfs-tsm provider {p:?} is not sev_guest")),
            Err(format!("configfs-tsm provider {p:?} is not tdx_guest")),
        ),
        Err(e) => (Err(e.clone()), Err(e.clone())),
    };
    let line = |source, r: Result<(), String>, ok: String| Detection {
        source,
        available: r.is_ok(),
        reason: r.err().unwrap_or(ok),
    };
    out.push(line(
        SourceKind::SnpConfigfsTsm,
        snp_cfg,
        format!("{} with provider sev_guest", cfg.configfs_tsm.display()),
    ));
    let dev = device_state(&cfg.sev_guest);
    out.push(line(
        SourceKind::SnpSevGuest,
        dev,
        format!("{} can be opened", cfg.sev_guest.display()),
    ));
    out.push(line(
        SourceKind::TdxConfigfsTsm,
        tdx_cfg,
        format!("{} with provider tdx_guest", cfg.configfs_tsm.display()),
    ));
    out.push(Detection {
        source: SourceKind::TdxGuestDevice,
        available: false,
        reason: match device_state(&cfg.tdx_guest) {
            Ok(()) => format!(
                "{} exists, but it yields only a TDREPORT; sgl gets quotes through configfs-tsm",
                cfg.tdx_guest.display()
            ),
            Err(e) => e,
        },
    });
    out.push(match &cfg.simulated_key {
        Some(p) => Detection {
            source: SourceKind::Simulated,
            available: true,
            reason: format!("development only, key {} (never hardware)", p.display()),
        },
        None => Detection {
            source: SourceKind::Simulated,
            available: false,
            reason: "not enabled (development only: pass --simulated)".into(),
        },
    });
    out
}

fn device_state(p: &Path) -> Result<(), String> {
    if !p.exists() {
        return Err(format!(
            "{} does not exist (not a confidential guest, or the driver is not loaded)",
            p.display()
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map(|_| ())
        .map_err(|e| format!("{} cannot be opened: {e}", p.display()))
}

/// The best available source: hardware first (SNP configfs-tsm, TDX
/// configfs-tsm, `/dev/sev-guest`), simulated only when configured.
pub fn best_source(cfg: &SourceConfig) -> Result<Box<dyn EvidenceSource>, AttestError> {
    let found = detect(cfg);
    let avail = |k: SourceKind| found.iter().any(|d| d.source == k && d.available);
    if avail(SourceKind::SnpConfigfsTsm) {
        return Ok(Box::new(SnpConfigfs {
            root: cfg.configfs_tsm.clone(),
        }));
    }
    if avail(SourceKind::TdxConfigfsTsm) {
        return Ok(Box::new(TdxConfigfs {
            root: cfg.configfs_tsm.clone(),
        }));
    }
    if avail(SourceKind::SnpSevGuest) {
        return Ok(Box::new(SnpSevGuest {
            device: cfg.sev_guest.clone(),
        }));
    }
    if let Some(p) = &cfg.simulated_key {
        return Ok(Box::new(Simulated::open(p)?));
    }
    let reasons: Vec<String> = found
        .iter()
        .map(|d| format!("{}: {}", d.source.as_str(), d.reason))
        .collect();
    Err(AttestError::NoSource(reasons.join("; ")))
}

/// A named source, for `sgl attest --source`.
pub fn named_source(
    kind: SourceKind,
    cfg: &SourceConfig,
) -> Result<Box<dyn EvidenceSource>, AttestError> {
    Ok(match kind {
        SourceKind::SnpConfigfsTsm => Box::new(SnpConfigfs {
            root: cfg.configfs_tsm.clone(),
        }),
        SourceKind::SnpSevGuest => Box::new(SnpSevGuest {
            device: cfg.sev_guest.clone(),
        }),
        SourceKind::TdxConfigfsTsm => Box::new(TdxConfigfs {
            root: cfg.configfs_tsm.clone(),
        }),
        SourceKind::TdxGuestDevice => {
            return Err(AttestError::NoSource(
                "/dev/tdx_guest yields only a TDREPORT; use configfs-tsm for TDX quotes".into(),
            ))
        }
        SourceKind::Simulated => {
            let p = cfg.simulated_key.as_ref().ok_or_else(|| {
                AttestError::NoSource("simulated evidence needs a key file".into())
            })?;
            Box::new(Simulated::open(p)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/data/tee/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// The auxblob path: a certificate table as the host hands it out (VCEK,
    /// ASK, ARK, each padded) becomes the evidence's `certs`.
    #[test]
    fn auxblob_certificate_table_becomes_certs() {
        let report = hex::decode(
            String::from_utf8(sample("report_milan.hex"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let vcek = sample("vcek_milan.der");
        let entries = [
            (snp::GUID_VCEK, vcek.clone()),
            (snp::GUID_ASK, vec![0x30, 0x00]),
        ];
        let mut table = Vec::new();
        let mut data = Vec::new();
        let header_len = 24 * (entries.len() + 1);
        for (guid, bytes) in &entries {
            let mut padded = bytes.clone();
            padded.resize(bytes.len().div_ceil(64) * 64, 0);
            table.extend_from_slice(&snp::guid_bytes(guid));
            table.extend_from_slice(&((header_len + data.len()) as u32).to_le_bytes());
            table.extend_from_slice(&(padded.len() as u32).to_le_bytes());
            data.extend_from_slice(&padded);
        }
        table.extend_from_slice(&[0u8; 24]);
        table.extend_from_slice(&data);
        let ev = snp_evidence(report, &table).unwrap();
        let certs = ev.certs.unwrap();
        assert_eq!(certs.vcek.unwrap().0, vcek);
        assert_eq!(certs.ask.unwrap().0, vec![0x30, 0x00]);
        assert!(certs.ark.is_none());
        assert!(snp_evidence(vec![0; 10], &[]).is_err());
    }

    #[test]
    fn detect_without_hardware_explains_and_best_source_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SourceConfig {
            configfs_tsm: dir.path().join("tsm"),
            sev_guest: dir.path().join("sev-guest"),
            tdx_guest: dir.path().join("tdx_guest"),
            simulated_key: None,
        };
        let found = detect(&cfg);
        assert!(found.iter().all(|d| !d.available));
        assert!(matches!(best_source(&cfg), Err(AttestError::NoSource(_))));
        let sim = SourceConfig {
            simulated_key: Some(dir.path().join("k.json")),
            ..cfg
        };
        let src = best_source(&sim).unwrap();
        assert_eq!(src.kind(), SourceKind::Simulated);
        let ev = src.collect(&[5; 64]).unwrap();
        assert_eq!(ev.format, EvidenceFormat::Simulated);
    }
}
