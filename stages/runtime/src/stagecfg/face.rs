//! `[face]` section: settings of the face stage.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Settings of the face stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaceConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9102`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 2.
    pub concurrency: usize,
}

impl Default for FaceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
            concurrency: 2,
        }
    }
}
