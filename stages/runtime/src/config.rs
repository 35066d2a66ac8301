//! Layered configuration shared by every binary (docs/architecture.md §8):
//! built-in defaults < `configs/*.toml` (or `--config FILE`) < `LIPSYNC_<SECTION>__<KEY>`
//! environment variables < `--set section.key=value` flags. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::stagecfg::{AudioConfig, FaceConfig, InferConfig, ModelsConfig, MuxConfig};

/// Exit code for an invalid configuration or command line (`EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// Environment variables with the `LIPSYNC_` prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["CONFIG", "NATS_SERVER_BIN", "PYTHON"];

/// The whole configuration. Each binary reads the sections it needs; all binaries accept
/// the same file so one `configs/default.toml` serves a deployment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection and JetStream topology.
    pub nats: NatsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Trace export (OpenTelemetry, OTLP).
    pub trace: TraceConfig,
    /// Stage runner behaviour shared by all stages.
    pub runner: RunnerConfig,
    /// Artifact store.
    pub artifacts: ArtifactsConfig,
    /// Task records.
    pub tasks: TasksConfig,
    /// How results are served.
    pub outputs: OutputsConfig,
    /// Fetch stage.
    pub fetch: FetchConfig,
    /// HTTP gateway.
    pub gateway: GatewayConfig,
    /// Face stage.
    pub face: FaceConfig,
    /// Audio stage.
    pub audio: AudioConfig,
    /// Inference stage.
    pub infer: InferConfig,
    /// Mux stage.
    pub mux: MuxConfig,
    /// Model profile selection.
    pub models: ModelsConfig,
}

/// NATS connection and JetStream topology settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Give up connecting after this many seconds at start-up. Default 30.
    pub connect_timeout_s: u64,
    /// Stream/bucket replicas: 1 for a single server, 3 in a cluster. Default 1.
    pub replicas: usize,
    /// Admission limit: `POST /sync` answers 503 while the work stream holds this many
    /// messages. Every accepted, unfinished task holds one to three messages, so the
    /// stream itself is sized `3 x max_queued_jobs + 64` and hand-offs between the stages
    /// of accepted tasks always have room. Default 10000.
    pub max_queued_jobs: i64,
    /// Seconds a delivered job may go without an ack or progress ack before redelivery.
    /// Default 60.
    pub ack_wait_s: u64,
    /// Deliveries of one job before the task fails with `retries_exhausted`. Default 5.
    pub max_deliver: i64,
    /// Duplicate window of the work stream in seconds (Msg-Id dedup). Default 600.
    pub duplicate_window_s: u64,
    /// Whether this process changes existing streams and consumers whose settings differ
    /// from this configuration. Missing objects are always created; with `false` a
    /// difference is only reported. Set it on one process of a deployment (the gateway
    /// in the shipped manifests) so replicas never flip-flop shared settings.
    /// Default false.
    pub apply_topology: bool,
    /// Cluster-wide ceiling of fetch jobs in flight (the consumer's `max_ack_pending`,
    /// shared by every replica; each process takes only as many as its own permits).
    /// Default 1024.
    pub fetch_max_in_flight: i64,
    /// Cluster-wide ceiling of face jobs in flight. Default 1024.
    pub face_max_in_flight: i64,
    /// Cluster-wide ceiling of audio jobs in flight. Default 1024.
    pub audio_max_in_flight: i64,
    /// Cluster-wide ceiling of inference jobs in flight: at least the number of GPUs of
    /// the whole deployment. Default 256.
    pub infer_max_in_flight: i64,
    /// Cluster-wide ceiling of mux jobs in flight. Default 1024.
    pub mux_max_in_flight: i64,
}

impl NatsConfig {
    /// The cluster-wide in-flight ceiling of `stage` (its consumer's `max_ack_pending`).
    pub fn max_in_flight(&self, stage: lipsync_schemas::Stage) -> i64 {
        use lipsync_schemas::Stage;
        match stage {
            Stage::Fetch => self.fetch_max_in_flight,
            Stage::Face => self.face_max_in_flight,
            Stage::Audio => self.audio_max_in_flight,
            Stage::Infer => self.infer_max_in_flight,
            Stage::Mux => self.mux_max_in_flight,
        }
    }

    /// Hard message limit of the work stream: room for every accepted task's hand-offs
    /// above the admission limit (`-1`: none).
    pub fn work_stream_max_messages(&self) -> i64 {
        if self.max_queued_jobs <= 0 {
            -1
        } else {
            self.max_queued_jobs.saturating_mul(3).saturating_add(64)
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            connect_timeout_s: 30,
            replicas: 1,
            max_queued_jobs: 10_000,
            ack_wait_s: 60,
            max_deliver: 5,
            duplicate_window_s: 600,
            apply_topology: false,
            fetch_max_in_flight: 1024,
            face_max_in_flight: 1024,
            audio_max_in_flight: 1024,
            infer_max_in_flight: 256,
            mux_max_in_flight: 1024,
        }
    }
}

/// Log output settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty`, `compact` or `json`. Default `compact`.
    pub format: LogFormat,
    /// tracing `EnvFilter` directive; `RUST_LOG` wins when set. Default `info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Compact,
            filter: "info".into(),
        }
    }
}

/// OpenTelemetry trace export. Every job is a span of its task's trace (trace id = the
/// task id's 32 hex digits); the context travels in the work messages' `traceparent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// OTLP/HTTP (protobuf) collector, e.g. `http://otel-collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it. Empty = no export (the default).
    pub otlp_endpoint: String,
    /// Milliseconds between export batches. Default 5000.
    pub export_interval_ms: u64,
    /// Seconds one export request may take. Default 10.
    pub export_timeout_s: u64,
    /// Finished spans held for export; more are dropped while the collector is slow or
    /// away. Default 2048.
    pub max_queued_spans: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            export_interval_ms: 5000,
            export_timeout_s: 10,
            max_queued_spans: 2048,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Multi-line, human-friendly.
    Pretty,
    /// One line per event.
    Compact,
    /// One JSON object per event.
    Json,
}

/// Stage runner behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// First NAK delay for a transient error in seconds; doubles per delivery. Default 2.
    pub nak_delay_s: f64,
    /// Upper bound of the NAK delay in seconds. Default 60.
    pub nak_delay_max_s: f64,
    /// Seconds in-flight jobs get to finish on SIGINT/SIGTERM before they are NAKed.
    /// Default 20.
    pub shutdown_grace_s: u64,
    /// Longest wait of one pull request in seconds. Default 5.
    pub pull_expires_s: u64,
    /// Minimum milliseconds between two progress writes of one job. Default 500.
    pub progress_interval_ms: u64,
    /// A job that reports no progress for this many seconds is aborted (its tool
    /// processes killed) and retried. Must be below `nats.ack_wait_s`, since a job
    /// without progress also sends no in-progress acks. 0: three quarters of
    /// `nats.ack_wait_s`. Default 0.
    pub stall_timeout_s: f64,
}

impl RunnerConfig {
    /// The effective stall timeout for an `ack_wait_s`.
    pub fn stall_timeout(&self, ack_wait_s: u64) -> std::time::Duration {
        let ack = ack_wait_s.max(1) as f64;
        let s = if self.stall_timeout_s > 0.0 {
            self.stall_timeout_s.min(ack * 0.95)
        } else {
            ack * 0.75
        };
        std::time::Duration::from_secs_f64(s)
    }
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            nak_delay_s: 2.0,
            nak_delay_max_s: 60.0,
            shutdown_grace_s: 20,
            pull_expires_s: 5,
            progress_interval_ms: 500,
            stall_timeout_s: 0.0,
        }
    }
}

/// Artifact store settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactsConfig {
    /// Retention of inputs, intermediates and outputs in seconds. Default 604800 (7 days).
    pub ttl_s: u64,
    /// Size cap of the media bucket (inputs, intermediates, outputs) in bytes; -1 for
    /// none. Keep it below the server's `max_file_store` minus what task records and the
    /// work queue need: media then never takes their space (its own stream, discard-new),
    /// and a full bucket only refuses new media. Default 16 GiB (the shipped local
    /// nats.conf has a 20 GB file store).
    pub max_bytes: i64,
    /// New tasks are refused at the entry (`storage_full`, 507) while fewer than this many
    /// bytes are left under `max_bytes`. Default 256 MiB.
    pub admission_reserve_bytes: u64,
    /// Local scratch directory for stages (temp files). Default: the system temp dir.
    pub scratch_dir: Option<PathBuf>,
    /// Where media lives: `nats` (the JetStream object store, embedded, the default) or
    /// `s3` (an S3-compatible bucket, `artifacts.s3.*`). Task records and work messages
    /// stay in NATS either way.
    pub backend: ArtifactBackend,
    /// The S3-compatible bucket used when `backend = "s3"`.
    pub s3: S3Config,
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            ttl_s: 7 * 24 * 3600,
            max_bytes: 16 << 30,
            admission_reserve_bytes: 256 << 20,
            scratch_dir: None,
            backend: ArtifactBackend::Nats,
            s3: S3Config::default(),
        }
    }
}

/// Which artifact backend holds the media.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactBackend {
    /// The JetStream object store of the NATS servers.
    #[default]
    Nats,
    /// An S3-compatible bucket.
    S3,
}

/// An S3-compatible bucket (`artifacts.s3.*`). Credentials come from `access_key_id` /
/// `secret_access_key` / `session_token` (best set through `LIPSYNC_ARTIFACTS__S3__*`
/// environment variables), else from the `*_file` keys (files holding the value), else
/// from the standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`
/// environment variables. They are never printed: `--print-config` redacts them and the
/// `Debug` form leaves them out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL of a self-hosted or non-AWS server, e.g. `http://127.0.0.1:9000`;
    /// empty for AWS itself. An `http://` endpoint allows plain HTTP. Default empty.
    pub endpoint: String,
    /// Bucket name (required with `backend = "s3"`; it must exist). Default empty.
    pub bucket: String,
    /// Region. Default `us-east-1`.
    pub region: String,
    /// Key prefix inside the bucket (`<prefix>/<task_id>/<name>`), so one bucket can
    /// serve several deployments. Default empty.
    pub prefix: String,
    /// Path-style addressing (`<endpoint>/<bucket>/<key>`), as most self-hosted servers
    /// need; false for virtual-hosted style (`<bucket>.<endpoint>/<key>`). Default true.
    pub path_style: bool,
    /// Access key id. Default empty (then `access_key_id_file`, then `AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// File holding the access key id. Default none.
    pub access_key_id_file: Option<PathBuf>,
    /// Secret access key. Default empty (then `secret_access_key_file`, then
    /// `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// File holding the secret access key. Default none.
    pub secret_access_key_file: Option<PathBuf>,
    /// Session token of temporary credentials. Default empty (then `session_token_file`,
    /// then `AWS_SESSION_TOKEN`).
    pub session_token: String,
    /// File holding the session token. Default none.
    pub session_token_file: Option<PathBuf>,
    /// Objects of at least this many bytes are uploaded in parts of this size (multipart
    /// upload, S3's minimum is 5 MiB); smaller ones in one request. Default 8 MiB.
    pub part_size_bytes: u64,
    /// Parts uploaded at once per upload; memory per upload is about
    /// `(upload_concurrency + 1) * part_size_bytes`. Default 4.
    pub upload_concurrency: usize,
    /// Retries of one failed request (connection refused or reset, 5xx, throttling),
    /// with exponential backoff. Default 10.
    pub max_retries: usize,
    /// Give up retrying a request after this many seconds. Default 180.
    pub retry_timeout_s: u64,
    /// Timeout of one request in seconds (a part upload, a read chunk). Default 300.
    pub request_timeout_s: u64,
    /// Lifetime of presigned URLs (`outputs.presign`, `POST /uploads`) in seconds.
    /// Default 3600.
    pub presign_expiry_s: u64,
    /// Every this many seconds the gateway deletes objects under the prefix older than
    /// `artifacts.ttl_s` (the retention sweep); 0 turns it off when the bucket's own
    /// lifecycle rules expire objects (see docs/storage.md). Default 3600.
    pub sweep_interval_s: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            prefix: String::new(),
            path_style: true,
            access_key_id: String::new(),
            access_key_id_file: None,
            secret_access_key: String::new(),
            secret_access_key_file: None,
            session_token: String::new(),
            session_token_file: None,
            part_size_bytes: 8 << 20,
            upload_concurrency: 4,
            max_retries: 10,
            retry_timeout_s: 180,
            request_timeout_s: 300,
            presign_expiry_s: 3600,
            sweep_interval_s: 3600,
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { REDACTED };
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("access_key_id", &set(&self.access_key_id))
            .field("access_key_id_file", &self.access_key_id_file)
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("session_token", &set(&self.session_token))
            .field("session_token_file", &self.session_token_file)
            .field("part_size_bytes", &self.part_size_bytes)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout_s", &self.retry_timeout_s)
            .field("request_timeout_s", &self.request_timeout_s)
            .field("presign_expiry_s", &self.presign_expiry_s)
            .field("sweep_interval_s", &self.sweep_interval_s)
            .finish()
    }
}

/// How the gateway serves results (`GET /outputs/...`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputsConfig {
    /// With the `s3` backend, answer `GET /outputs/{task_id}/{file}` with a 307 redirect
    /// to a presigned GET URL of the object (valid `artifacts.s3.presign_expiry_s`), so
    /// result bytes come from the bucket (or a CDN in front of it) instead of through the
    /// gateway. The task record's `output_video_url` stays the same relative path.
    /// Ignored with the `nats` backend. Default false.
    pub presign: bool,
}

/// Task record settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// How long task records are kept in seconds. Default 604800 (7 days).
    pub ttl_s: u64,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            ttl_s: 7 * 24 * 3600,
        }
    }
}

/// Fetch stage settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9101`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 4.
    pub concurrency: usize,
    /// Allow downloads from loopback/private networks (tests, local demos). Default false.
    pub allow_private_networks: bool,
    /// Extra networks allowed despite the private-address guard, as CIDRs. Default none.
    pub allow_cidrs: Vec<String>,
    /// Largest accepted input in bytes. Default 2 GiB.
    pub max_bytes: u64,
    /// TCP connect timeout in seconds. Default 10.
    pub connect_timeout_s: u64,
    /// Longest silence while reading a response in seconds. Default 30.
    pub read_timeout_s: u64,
    /// Whole-download time limit in seconds. Default 600.
    pub total_timeout_s: u64,
    /// Redirects followed at most. Default 5.
    pub max_redirects: usize,
    /// Ports downloads may reach (empty: any; not enforced with
    /// `allow_private_networks`). Default 80, 443.
    pub allowed_ports: Vec<u16>,
    /// NAT64 prefixes (IPv6 /96) whose addresses are judged by the IPv4 address they
    /// embed (also used for webhooks). Default `64:ff9b::/96`.
    pub nat64_prefixes: Vec<String>,
    /// Longest URL accepted. Default 2048.
    pub max_url_len: usize,
    /// Longest accepted input duration in seconds. Default 600.
    pub max_duration_s: f64,
    /// Shortest accepted audio duration in seconds. Default 0.5.
    pub min_audio_duration_s: f64,
    /// Largest accepted video width (either orientation). Default 3840.
    pub max_width: u32,
    /// Largest accepted video height (either orientation). Default 2160.
    pub max_height: u32,
    /// Most video frames at 25 fps. Default 15000 (10 min).
    pub max_frames: u64,
    /// Time limit of one ffprobe/ffmpeg run in seconds. Default 300.
    pub tool_timeout_s: u64,
    /// Base time limit of every ffmpeg/ffprobe run of every stage, in seconds of CPU time
    /// (and of wall time for runs that are not frame readers); the limit of a run is
    /// `tool_time_base_s + tool_time_per_media_s x media seconds`. Default 60.
    pub tool_time_base_s: f64,
    /// Seconds of time limit per second of media a tool run handles. Default 10.
    pub tool_time_per_media_s: f64,
    /// The audio conversion stops this many seconds past `max_duration_s`; audio that
    /// still decodes there is `input_too_long` (whatever its header claims). Default 1.
    pub audio_margin_s: f64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
            concurrency: 4,
            allow_private_networks: false,
            allow_cidrs: Vec::new(),
            max_bytes: 2 << 30,
            connect_timeout_s: 10,
            read_timeout_s: 30,
            total_timeout_s: 600,
            max_redirects: 5,
            allowed_ports: vec![80, 443],
            nat64_prefixes: vec!["64:ff9b::/96".into()],
            max_url_len: 2048,
            max_duration_s: 600.0,
            min_audio_duration_s: 0.5,
            max_width: 3840,
            max_height: 2160,
            max_frames: 15_000,
            tool_timeout_s: 300,
            tool_time_base_s: 60.0,
            tool_time_per_media_s: 10.0,
            audio_margin_s: 1.0,
        }
    }
}

impl FetchConfig {
    /// The download policy of these keys: what `video_url`/`audio_url` (and the
    /// `output_upload_url` mux delivers to) may point at. Errors name the bad key.
    pub fn url_policy(&self) -> Result<lipsync_netguard::UrlPolicy, String> {
        lipsync_netguard::UrlPolicy::from_settings(&lipsync_netguard::PolicySettings {
            section: "fetch",
            allow_private_networks: self.allow_private_networks,
            allow_cidrs: &self.allow_cidrs,
            allowed_ports: &self.allowed_ports,
            nat64_prefixes: &self.nat64_prefixes,
            max_url_len: self.max_url_len,
        })
    }
}

/// HTTP gateway settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the API listens on. Default `0.0.0.0:8000` (the seed's port).
    pub listen: SocketAddr,
    /// Plain bearer API keys of tenant `default` with role `user` (the keys of earlier
    /// versions). With no key configured at all (`api_keys`, `keys`, `api_keys_file`) the
    /// API is open, as the seed's server (a warning is logged). Default none.
    pub api_keys: Vec<String>,
    /// API keys with a tenant and a role (`user` sees and manages only its tenant's tasks;
    /// `admin` sees all, `/ws` and, when `metrics_require_admin`, `/metrics`). Each entry
    /// gives exactly one of `key` (plain), `key_sha256` (hex SHA-256 of the key) or
    /// `key_file` (a file holding the key). Default none.
    pub keys: Vec<ApiKeyConfig>,
    /// File of further keys, one per line: `<tenant> <user|admin> <key>` or
    /// `<tenant> <user|admin> sha256:<hex>`; `#` starts a comment (for Kubernetes
    /// Secrets). Read at start-up. Default none.
    pub api_keys_file: Option<PathBuf>,
    /// Most tasks one tenant may have queued (not yet started) at once; more gets 429
    /// with `Retry-After`. 0 = no limit. Applies only when keys are configured. Default 100.
    pub tenant_max_queued: u32,
    /// Most tasks one tenant may have processing at once (counted at submit); more gets
    /// 429. 0 = no limit. Applies only when keys are configured. Default 20.
    pub tenant_max_in_flight: u32,
    /// Failed authentications allowed per client address per minute; beyond, 429 with
    /// `Retry-After`. 0 = no limit. Default 10.
    pub auth_failures_per_min: u32,
    /// Longest time a client may take to send a request's headers (slowloris guard), in
    /// seconds. Default 10.
    pub header_read_timeout_s: u64,
    /// A connection with no bytes read or written for this long is closed, in seconds
    /// (WebSockets stay alive through their pings). Default 120.
    pub idle_timeout_s: u64,
    /// Most open client connections; further ones wait in the listen backlog. Default 4096.
    pub max_connections: usize,
    /// Most requests handled at once; further ones wait. Default 1024.
    pub max_concurrent_requests: usize,
    /// Most fields of a multipart body. Default 16.
    pub multipart_max_fields: usize,
    /// Whole-upload time limit of a multipart body in seconds (slow uploads end with 408).
    /// Default 3600.
    pub upload_timeout_s: u64,
    /// Largest WebSocket message a client may send, in bytes (clients send nothing large);
    /// a larger one closes the socket with 1009. Default 4096.
    pub ws_max_message_bytes: usize,
    /// Most open WebSockets per API key (or per client address when open). Default 64.
    pub ws_max_per_key: usize,
    /// Most open WebSockets in total. Default 10000.
    pub ws_max_total: usize,
    /// Seconds between WebSocket pings; a peer that has not answered the previous ping
    /// by the next one is closed. Default 30.
    pub ws_ping_interval_s: u64,
    /// Serve `/metrics` on this separate address instead of the API port. Default unset
    /// (on the API port).
    pub metrics_listen: Option<SocketAddr>,
    /// On the API port, `/metrics` needs an admin key (when keys are configured).
    /// Default false.
    pub metrics_require_admin: bool,
    /// Origins (`scheme://host[:port]`) allowed to send state-changing requests and open
    /// WebSockets from a browser, besides the server's own origin and `cors_origins`;
    /// `*` allows any. Requests without an `Origin` header (non-browser clients) pass.
    /// Default none.
    pub allowed_origins: Vec<String>,
    /// `/readyz` answers 503 unless every stage has a live consumer (else it only reports
    /// them). Default false.
    pub readyz_requires_stages: bool,
    /// One log line per request (method, route, status, duration, request id). Default true.
    pub access_log: bool,
    /// Largest page of `GET /tasks`. Default 100.
    pub list_max_limit: usize,
    /// `inference_ckpt_path` values taken as the default model (the seed guide's checkpoint
    /// paths); nothing is ever read from them. Default `checkpoints/unet.ckpt`,
    /// `checkpoints/latentsync_unet.pt`.
    pub model_aliases: Vec<String>,
    /// File holding the webhook secret (wins over `webhook_secret`). Default unset.
    pub webhook_secret_file: Option<PathBuf>,
    /// Allow webhooks to loopback/private addresses (tests, local demos). Default false.
    pub webhook_allow_private_networks: bool,
    /// Networks webhooks may reach despite the private-address guard, as CIDRs. Default none.
    pub webhook_allow_cidrs: Vec<String>,
    /// Ports webhooks may reach (empty: any). Default 80, 443.
    pub webhook_allowed_ports: Vec<u16>,
    /// Largest JSON request body in bytes. Default 65536.
    pub max_json_body_bytes: usize,
    /// Largest multipart upload (both files) in bytes. Default 2 GiB.
    pub max_upload_bytes: u64,
    /// Requests per second allowed per API key (or per client address when open); 0 = no
    /// limit. Default 0.
    pub rate_limit_per_s: u32,
    /// Burst size of the rate limit. Default 50.
    pub rate_limit_burst: u32,
    /// Allowed CORS origins; `*` allows any. Default none (same-origin only).
    pub cors_origins: Vec<String>,
    /// Secret for webhook HMAC-SHA256 signatures; webhooks are refused when empty.
    pub webhook_secret: String,
    /// Webhook delivery attempts. Default 5.
    pub webhook_max_attempts: u32,
    /// Webhook request timeout in seconds. Default 10.
    pub webhook_timeout_s: u64,
    /// Further model names clients may request via `inference_ckpt_path`. The profile
    /// this deployment serves (`models.profile`, or what `auto` finds installed) is always
    /// allowed and is the default. Default none (only the served profile).
    pub models: Vec<String>,
    /// Default DDIM steps. Default 20.
    pub default_steps: u32,
    /// Default guidance scale. Default 1.5.
    pub default_guidance: f64,
    /// Whole-request time limit in seconds (uploads excluded). Default 30.
    pub request_timeout_s: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            api_keys: Vec::new(),
            keys: Vec::new(),
            api_keys_file: None,
            tenant_max_queued: 100,
            tenant_max_in_flight: 20,
            auth_failures_per_min: 10,
            header_read_timeout_s: 10,
            idle_timeout_s: 120,
            max_connections: 4096,
            max_concurrent_requests: 1024,
            multipart_max_fields: 16,
            upload_timeout_s: 3600,
            ws_max_message_bytes: 4096,
            ws_max_per_key: 64,
            ws_max_total: 10_000,
            ws_ping_interval_s: 30,
            metrics_listen: None,
            metrics_require_admin: false,
            allowed_origins: Vec::new(),
            readyz_requires_stages: false,
            access_log: true,
            list_max_limit: 100,
            model_aliases: vec![
                "checkpoints/unet.ckpt".into(),
                "checkpoints/latentsync_unet.pt".into(),
            ],
            webhook_secret_file: None,
            webhook_allow_private_networks: false,
            webhook_allow_cidrs: Vec::new(),
            webhook_allowed_ports: vec![80, 443],
            max_json_body_bytes: 64 * 1024,
            max_upload_bytes: 2 << 30,
            rate_limit_per_s: 0,
            rate_limit_burst: 50,
            cors_origins: Vec::new(),
            webhook_secret: String::new(),
            webhook_max_attempts: 5,
            webhook_timeout_s: 10,
            models: vec![
                "latentsync-1.6".into(),
                "latentsync-1.5".into(),
                "tiny".into(),
            ],
            default_steps: 20,
            default_guidance: 1.5,
            request_timeout_s: 30,
        }
    }
}

/// Role of an API key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyRole {
    /// Sees and manages its tenant's tasks only.
    #[default]
    User,
    /// Operator: every task, `/ws`, metrics.
    Admin,
}

/// One API key of `gateway.keys`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeyConfig {
    /// Tenant the key belongs to (tasks are owned by tenants).
    pub tenant: String,
    /// `user` or `admin`. Default `user`.
    pub role: KeyRole,
    /// The key itself.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// Hex SHA-256 of the key (keeps the key out of the config).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key_sha256: String,
    /// File holding the key (trailing whitespace ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Command-line flags every binary accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Configuration file(s), merged in order over the defaults (default:
    /// `configs/default.toml` when it exists).
    #[arg(long = "config", env = "LIPSYNC_CONFIG", value_delimiter = ',')]
    pub config: Vec<PathBuf>,
    /// Override one key, e.g. `--set fetch.max_bytes=1000000`; repeatable.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Load a configuration of type `C` from the layers described in the module docs.
pub fn load<C>(args: &ConfigArgs) -> Result<C, ConfigError>
where
    C: Default + Serialize + DeserializeOwned,
{
    let mut fig = Figment::from(Serialized::defaults(C::default()));
    let files: Vec<PathBuf> = if args.config.is_empty() {
        let default = Path::new("configs/default.toml");
        if default.exists() {
            vec![default.to_path_buf()]
        } else {
            Vec::new()
        }
    } else {
        args.config.clone()
    };
    for f in &files {
        if !f.exists() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                f.display()
            )));
        }
        fig = fig.merge(Toml::file_exact(f));
    }
    fig = fig.merge(
        Env::prefixed("LIPSYNC_")
            .split("__")
            .ignore(NON_CONFIG_ENV)
            .filter(|k| k.as_str().contains('.')),
    );
    for kv in &args.set {
        let (key, value) = kv
            .split_once('=')
            .ok_or_else(|| ConfigError(format!("`--set {kv}`: expected SECTION.KEY=VALUE")))?;
        let doc = set_flag_toml(key.trim(), value.trim());
        fig = fig.merge(Toml::string(&doc));
    }
    fig.extract::<C>().map_err(|e| ConfigError(e.to_string()))
}

/// Turn `key=value` into a TOML line, quoting the value when it is not a TOML value.
fn set_flag_toml(key: &str, value: &str) -> String {
    let as_value = format!("v = {value}");
    if value.parse::<toml::Value>().is_ok() || toml::from_str::<toml::Table>(&as_value).is_ok() {
        format!("{key} = {value}")
    } else {
        format!("{key} = {}", toml::Value::String(value.to_owned()))
    }
}

/// Text that replaces a secret in `--print-config`.
pub const REDACTED: &str = "<redacted>";

/// Whether a configuration key names a secret (API keys and their hashes, secrets,
/// passwords, tokens); `*_file` keys (paths of secret files) are not.
fn secret_key(k: &str) -> bool {
    !k.ends_with("_file")
        && (k == "key"
            || k == "api_keys"
            || k == "access_key_id"
            || k.starts_with("key_")
            || ["secret", "password", "token"]
                .iter()
                .any(|w| k.contains(w)))
}

/// Replace `user:password@` in every URL of a line.
fn redact_userinfo(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(['"', '\'', '/', ' ', ',']).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// Blank the non-empty strings of a TOML value text (`"x"`, `["a", "b"]`, an array line).
fn blank_strings(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' || c == '\'' {
            let mut body = String::new();
            let mut escaped = false;
            for d in chars.by_ref() {
                if d == c && !escaped {
                    break;
                }
                escaped = d == '\\' && !escaped;
                body.push(d);
            }
            out.push(c);
            if !body.is_empty() {
                out.push_str(REDACTED);
            }
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

/// The TOML text of a configuration (as `toml::to_string_pretty` writes it) with every
/// non-empty secret replaced by [`REDACTED`] and credentials removed from URLs; key order,
/// tables and `*_file` paths stay as they are.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_secret_array = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let redacted = if in_secret_array {
            if trimmed.starts_with(']') {
                in_secret_array = false;
            }
            blank_strings(line)
        } else if let Some((key, value)) = trimmed.split_once(" = ")
            && secret_key(key.trim())
        {
            if value.trim() == "[" {
                in_secret_array = true;
            }
            let indent = &line[..line.len() - trimmed.len()];
            format!("{indent}{key} = {}", blank_strings(value))
        } else {
            redact_userinfo(line)
        };
        out.push_str(&redacted);
        out.push('\n');
    }
    out
}

/// Load the configuration or exit: prints the effective config and exits 0 on
/// `--print-config`, prints the problem and exits 64 on an invalid one.
pub fn load_or_exit<C>(args: &ConfigArgs) -> C
where
    C: Default + Serialize + DeserializeOwned,
{
    match load::<C>(args) {
        Ok(cfg) => {
            if args.print_config {
                match toml::to_string_pretty(&cfg) {
                    Ok(s) => {
                        print!("{}", redact_secrets(&s));
                        std::process::exit(0);
                    }
                    Err(e) => {
                        eprintln!("error: cannot print configuration: {e}");
                        std::process::exit(EXIT_USAGE);
                    }
                }
            }
            cfg
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(EXIT_USAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_toml_matches_the_built_in_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/default.toml");
        let cfg: Config = load(&ConfigArgs {
            config: vec![path],
            ..Default::default()
        })
        .unwrap();
        assert!(
            cfg == Config::default(),
            "configs/default.toml is out of date: run scripts/gen-default-config.py"
        );
    }

    #[test]
    fn printed_config_redacts_secrets() {
        let mut cfg = Config::default();
        cfg.gateway.api_keys = vec!["plain-key-1".into()];
        cfg.gateway.webhook_secret = "hook-secret".into();
        cfg.gateway.keys = vec![ApiKeyConfig {
            tenant: "acme".into(),
            key: "acme-key".into(),
            ..Default::default()
        }];
        cfg.nats.url = "nats://user:pw@nats:4222".into();
        cfg.artifacts.s3.access_key_id = "AKIA-CANARY".into();
        cfg.artifacts.s3.secret_access_key = "s3-secret-canary".into();
        cfg.artifacts.s3.session_token = "s3-token-canary".into();
        let plain = toml::to_string_pretty(&cfg).unwrap();
        let text = redact_secrets(&plain);
        let debug = format!("{cfg:?}");
        for secret in [
            "plain-key-1",
            "hook-secret",
            "acme-key",
            ":pw@",
            "AKIA-CANARY",
            "s3-secret-canary",
            "s3-token-canary",
        ] {
            assert!(!text.contains(secret), "{secret} in\n{text}");
        }
        for secret in ["AKIA-CANARY", "s3-secret-canary", "s3-token-canary"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(text.contains("acme") && text.contains(REDACTED));
        assert!(text.contains("nats:4222"));
        // Nothing but the secrets changes: same lines, same order.
        assert_eq!(plain.lines().count(), text.lines().count());
        assert_eq!(
            redact_secrets(&toml::to_string_pretty(&Config::default()).unwrap()),
            toml::to_string_pretty(&Config::default()).unwrap()
        );
    }

    #[test]
    fn set_flags_quote_strings_only_when_needed() {
        assert_eq!(set_flag_toml("a.b", "3"), "a.b = 3");
        assert_eq!(set_flag_toml("a.b", "true"), "a.b = true");
        assert_eq!(set_flag_toml("a.b", "json"), "a.b = \"json\"");
        assert_eq!(
            set_flag_toml("nats.url", "nats://x:1"),
            "nats.url = \"nats://x:1\""
        );
    }

    #[test]
    fn cli_set_wins_and_unknown_keys_fail() {
        let args = ConfigArgs {
            config: vec![PathBuf::from("/nonexistent/never.toml")],
            ..Default::default()
        };
        assert!(load::<Config>(&args).is_err());

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[fetch]\nmax_bytes = 10\nconcurrency = 2\n").unwrap();
        let args = ConfigArgs {
            config: vec![f.clone()],
            set: vec!["fetch.concurrency=7".into(), "log.format=json".into()],
            print_config: false,
        };
        let cfg: Config = load(&args).unwrap();
        assert_eq!(cfg.fetch.max_bytes, 10);
        assert_eq!(cfg.fetch.concurrency, 7);
        assert_eq!(cfg.log.format, LogFormat::Json);

        std::fs::write(&f, "[fetch]\nmax_bytez = 10\n").unwrap();
        let err = load::<Config>(&ConfigArgs {
            config: vec![f.clone()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.0.contains("max_bytez"), "{err}");

        std::fs::write(&f, "[nope]\nx = 1\n").unwrap();
        assert!(
            load::<Config>(&ConfigArgs {
                config: vec![f],
                ..Default::default()
            })
            .is_err()
        );
    }
}
