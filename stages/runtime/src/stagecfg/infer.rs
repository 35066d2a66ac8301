//! `[infer]` section: settings of the infer stage.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Settings of the infer stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9104`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 1.
    pub concurrency: usize,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9104)),
            concurrency: 1,
        }
    }
}
