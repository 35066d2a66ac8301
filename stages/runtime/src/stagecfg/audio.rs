//! `[audio]` section: settings of the audio stage.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Settings of the audio stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9103`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 2.
    pub concurrency: usize,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9103)),
            concurrency: 2,
        }
    }
}
