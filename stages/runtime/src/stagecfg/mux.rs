//! `[mux]` section: settings of the mux stage.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Settings of the mux stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuxConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9105`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 2.
    pub concurrency: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9105)),
            concurrency: 2,
        }
    }
}
