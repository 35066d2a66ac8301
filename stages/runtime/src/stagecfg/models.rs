//! `[models]` section: which model profile the service runs and where its files are.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Model selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// `latentsync-1.6`, `latentsync-1.5`, `tiny` or `auto` (best installed real profile,
    /// else `tiny` with a loud warning). Default `auto`.
    pub profile: String,
    /// The model manifest; profile directories are relative to its folder. Default
    /// `models/manifest.toml`.
    pub manifest: PathBuf,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            profile: "auto".into(),
            manifest: PathBuf::from("models/manifest.toml"),
        }
    }
}
