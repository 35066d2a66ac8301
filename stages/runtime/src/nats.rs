//! NATS connection with retry, and the idempotent bootstrap of the JetStream topology
//! (docs/architecture.md, "NATS topology"): the work stream, one durable pull consumer per
//! stage, the advisory stream, the KV buckets and the artifact object store.
//!
//! Every process creates what is missing, with the deployment's settings. Existing
//! objects whose settings differ are changed only by a process with
//! `nats.apply_topology = true` (one per deployment); every other process reports the
//! difference and leaves it, so replicas with different local settings never flip-flop a
//! shared consumer. Re-running it on an existing setup changes nothing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use lipsync_schemas::{Stage, names};

use crate::config::{ArtifactsConfig, NatsConfig, TasksConfig};

/// Lifetime of idempotency keys (docs/architecture.md §3: 24 h).
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Errors while connecting or creating the topology.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// No connection within the configured time.
    #[error("cannot connect to NATS at {url} within {secs} s: {reason}")]
    Connect {
        /// Server URL.
        url: String,
        /// Seconds waited.
        secs: u64,
        /// Last error.
        reason: String,
    },
    /// A JetStream call failed.
    #[error("jetstream {what}: {reason}")]
    JetStream {
        /// What was being done.
        what: String,
        /// Error text.
        reason: String,
    },
    /// An existing object differs in a setting NATS cannot change in place.
    #[error("{0}")]
    Conflict(String),
}

fn js_err(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> NatsError {
    let what = what.into();
    move |e| NatsError::JetStream {
        what,
        reason: e.to_string(),
    }
}

/// Connect to NATS, retrying with backoff until `connect_timeout_s` has passed.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, NatsError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.connect_timeout_s);
    let mut delay = Duration::from_millis(100);
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None);
        // `retry_on_initial_connect` makes connect return at once; wait for the first
        // successful connection ourselves so start-up errors are visible.
        let attempt = async {
            let client = opts.connect(cfg.url.as_str()).await?;
            let mut waited = Duration::ZERO;
            while client.connection_state() != async_nats::connection::State::Connected {
                if waited > Duration::from_secs(cfg.connect_timeout_s) {
                    return Err(async_nats::ConnectError::new(
                        async_nats::ConnectErrorKind::TimedOut,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                waited += Duration::from_millis(50);
            }
            Ok(client)
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining.max(Duration::from_millis(1)), attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(url = %cfg.url, error = %e, "nats connect failed, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Ok(Err(e)) => {
                return Err(NatsError::Connect {
                    url: cfg.url.clone(),
                    secs: cfg.connect_timeout_s,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(NatsError::Connect {
                    url: cfg.url.clone(),
                    secs: cfg.connect_timeout_s,
                    reason: "timed out".into(),
                });
            }
        }
    }
}

/// Desired configuration of the work stream.
pub fn work_stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: names::WORK_STREAM.into(),
        description: Some("lipsync work queue, one subject per stage".into()),
        subjects: vec![names::WORK_SUBJECT_WILDCARD.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        max_messages: cfg.work_stream_max_messages(),
        duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
        ..Default::default()
    }
}

/// Desired configuration of a stage's durable pull consumer. Its `max_ack_pending` is the
/// deployment's cluster-wide ceiling for the stage (`nats.<stage>_max_in_flight`), shared
/// by all replicas; each process limits itself with its own permits.
pub fn consumer_config(cfg: &NatsConfig, stage: Stage) -> consumer::pull::Config {
    let max_ack_pending = cfg.max_in_flight(stage);
    consumer::pull::Config {
        durable_name: Some(names::consumer_name(stage).into()),
        name: Some(names::consumer_name(stage).into()),
        description: Some(format!("lipsync {stage} stage")),
        filter_subject: names::work_subject(stage),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(cfg.ack_wait_s),
        max_deliver: cfg.max_deliver,
        max_ack_pending,
        ..Default::default()
    }
}

/// What a bootstrap run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootstrapReport {
    /// Objects created.
    pub created: Vec<String>,
    /// Objects whose settings were changed, with what changed.
    pub updated: Vec<String>,
    /// Objects whose settings differ from this configuration but were left as they are
    /// (`nats.apply_topology = false`).
    pub differs: Vec<String>,
}

impl BootstrapReport {
    /// Whether the run changed nothing.
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty()
    }
}

/// Handles to everything the bootstrap made.
#[derive(Clone)]
pub struct Topology {
    /// JetStream context.
    pub js: jetstream::Context,
    /// Task records.
    pub tasks: kv::Store,
    /// Idempotency keys.
    pub idempotency: kv::Store,
    /// Artifacts.
    pub artifacts: object_store::ObjectStore,
}

fn diff<T: PartialEq + std::fmt::Debug>(out: &mut Vec<String>, what: &str, have: &T, want: &T) {
    if have != want {
        out.push(format!("{what}: {have:?} -> {want:?}"));
    }
}

/// Create what is missing of the topology (stream, consumers, advisory capture, buckets);
/// reconcile existing objects when `nats.apply_topology` is set, else report differences.
pub async fn bootstrap(
    js: &jetstream::Context,
    nats: &NatsConfig,
    tasks_cfg: &TasksConfig,
    artifacts_cfg: &ArtifactsConfig,
) -> Result<(Topology, BootstrapReport), NatsError> {
    let mut report = BootstrapReport::default();

    // Work stream.
    let want = work_stream_config(nats);
    match js.get_stream(names::WORK_STREAM).await {
        Ok(mut s) => {
            let have = s
                .info()
                .await
                .map_err(|e| js_err("stream info")(&e))?
                .config
                .clone();
            if have.retention != want.retention || have.storage != want.storage {
                return Err(NatsError::Conflict(format!(
                    "stream {} exists with retention {:?}/storage {:?}; it must be {:?}/{:?} \
                     (delete the stream to change this)",
                    names::WORK_STREAM,
                    have.retention,
                    have.storage,
                    want.retention,
                    want.storage
                )));
            }
            let mut changes = Vec::new();
            diff(&mut changes, "subjects", &have.subjects, &want.subjects);
            diff(&mut changes, "discard", &have.discard, &want.discard);
            diff(
                &mut changes,
                "replicas",
                &have.num_replicas,
                &want.num_replicas,
            );
            diff(
                &mut changes,
                "max_messages",
                &have.max_messages,
                &want.max_messages,
            );
            diff(
                &mut changes,
                "duplicate_window",
                &have.duplicate_window,
                &want.duplicate_window,
            );
            if !changes.is_empty() {
                let what = format!("stream {}: {}", names::WORK_STREAM, changes.join(", "));
                if nats.apply_topology {
                    js.update_stream(&want).await.map_err(|e| {
                        js_err(format!("update stream ({})", changes.join(", ")))(&e)
                    })?;
                    tracing::warn!(change = %what, "stream settings updated");
                    report.updated.push(what);
                } else {
                    report.differs.push(what);
                }
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            // Not found (or another API error, which create will surface). A process
            // starting beside this one may win the race: then the stream exists.
            match js.create_stream(want).await {
                Ok(_) => report
                    .created
                    .push(format!("stream {}", names::WORK_STREAM)),
                Err(e) => {
                    if js.get_stream(names::WORK_STREAM).await.is_err() {
                        return Err(js_err("create work stream")(&e));
                    }
                }
            }
        }
        Err(e) => return Err(js_err("get work stream")(&e)),
    }

    // KV buckets.
    let tasks = ensure_kv(
        js,
        kv::Config {
            bucket: names::TASKS_BUCKET.into(),
            description: "lipsync task records".into(),
            history: 1,
            max_age: Duration::from_secs(tasks_cfg.ttl_s),
            storage: stream::StorageType::File,
            num_replicas: nats.replicas,
            ..Default::default()
        },
        nats.apply_topology,
        &mut report,
    )
    .await?;
    let idempotency = ensure_kv(
        js,
        kv::Config {
            bucket: names::IDEMPOTENCY_BUCKET.into(),
            description: "lipsync Idempotency-Key -> task id".into(),
            history: 1,
            max_age: IDEMPOTENCY_TTL,
            storage: stream::StorageType::File,
            num_replicas: nats.replicas,
            ..Default::default()
        },
        nats.apply_topology,
        &mut report,
    )
    .await?;

    // Artifact store.
    let artifacts = ensure_object_store(js, nats, artifacts_cfg, &mut report).await?;

    // Every stage's consumer, and the capture of their max-deliveries advisories.
    for stage in Stage::ALL {
        ensure_consumer(js, nats, stage, &mut report).await?;
    }
    ensure_advisories(js, nats, &mut report).await?;

    for c in &report.created {
        tracing::info!(object = %c, "created");
    }
    for d in &report.differs {
        tracing::warn!(
            difference = %d,
            "existing topology differs from this configuration; left as it is \
             (only the process with nats.apply_topology = true changes it)"
        );
    }
    Ok((
        Topology {
            js: js.clone(),
            tasks,
            idempotency,
            artifacts,
        },
        report,
    ))
}

async fn ensure_kv(
    js: &jetstream::Context,
    want: kv::Config,
    apply: bool,
    report: &mut BootstrapReport,
) -> Result<kv::Store, NatsError> {
    let stream_name = format!("KV_{}", want.bucket);
    match js.get_stream(&stream_name).await {
        Ok(mut s) => {
            let have = s
                .info()
                .await
                .map_err(|e| js_err("kv info")(&e))?
                .config
                .clone();
            let mut changes = Vec::new();
            diff(&mut changes, "max_age", &have.max_age, &want.max_age);
            diff(
                &mut changes,
                "history",
                &have.max_messages_per_subject,
                &want.history,
            );
            diff(
                &mut changes,
                "replicas",
                &have.num_replicas,
                &want.num_replicas,
            );
            if !changes.is_empty() {
                let bucket = want.bucket.clone();
                let what = format!("kv {bucket}: {}", changes.join(", "));
                if apply {
                    js.update_key_value(want)
                        .await
                        .map_err(|e| js_err(format!("update kv {bucket}"))(&e))?;
                    report.updated.push(what);
                } else {
                    report.differs.push(what);
                }
            }
            js.get_key_value(stream_name.trim_start_matches("KV_"))
                .await
                .map_err(|e| js_err("get kv")(&e))
        }
        Err(_) => {
            let bucket = want.bucket.clone();
            let store = js
                .create_key_value(want)
                .await
                .map_err(|e| js_err(format!("create kv {bucket}"))(&e))?;
            report.created.push(format!("kv {bucket}"));
            Ok(store)
        }
    }
}

async fn ensure_object_store(
    js: &jetstream::Context,
    nats: &NatsConfig,
    cfg: &ArtifactsConfig,
    report: &mut BootstrapReport,
) -> Result<object_store::ObjectStore, NatsError> {
    let bucket = names::ARTIFACTS_BUCKET;
    let want_age = Duration::from_secs(cfg.ttl_s);
    let stream_name = format!("OBJ_{bucket}");
    match js.get_stream(&stream_name).await {
        Ok(mut s) => {
            let mut have = s
                .info()
                .await
                .map_err(|e| js_err("object store info")(&e))?
                .config
                .clone();
            let mut changes = Vec::new();
            diff(&mut changes, "max_age", &have.max_age, &want_age);
            diff(&mut changes, "max_bytes", &have.max_bytes, &cfg.max_bytes);
            diff(&mut changes, "replicas", &have.num_replicas, &nats.replicas);
            if !changes.is_empty() {
                let what = format!("object store {bucket}: {}", changes.join(", "));
                if nats.apply_topology {
                    have.max_age = want_age;
                    have.max_bytes = cfg.max_bytes;
                    have.num_replicas = nats.replicas;
                    js.update_stream(&have)
                        .await
                        .map_err(|e| js_err("update object store")(&e))?;
                    report.updated.push(what);
                } else {
                    report.differs.push(what);
                }
            }
            js.get_object_store(bucket)
                .await
                .map_err(|e| js_err("get object store")(&e))
        }
        Err(_) => {
            let store = js
                .create_object_store(object_store::Config {
                    bucket: bucket.into(),
                    description: Some("lipsync inputs, intermediates and outputs".into()),
                    max_age: want_age,
                    max_bytes: cfg.max_bytes,
                    storage: stream::StorageType::File,
                    num_replicas: nats.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err("create object store")(&e))?;
            report.created.push(format!("object store {bucket}"));
            Ok(store)
        }
    }
}

async fn ensure_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    stage: Stage,
    report: &mut BootstrapReport,
) -> Result<(), NatsError> {
    let stream = js
        .get_stream(names::WORK_STREAM)
        .await
        .map_err(|e| js_err("get work stream")(&e))?;
    let want = consumer_config(nats, stage);
    let name = names::consumer_name(stage);
    match stream.consumer_info(name).await {
        Ok(info) => {
            let have = &info.config;
            let mut changes = Vec::new();
            diff(
                &mut changes,
                "filter_subject",
                &have.filter_subject,
                &want.filter_subject,
            );
            diff(&mut changes, "ack_wait", &have.ack_wait, &want.ack_wait);
            diff(
                &mut changes,
                "max_deliver",
                &have.max_deliver,
                &want.max_deliver,
            );
            diff(
                &mut changes,
                "max_ack_pending",
                &have.max_ack_pending,
                &want.max_ack_pending,
            );
            if have.ack_policy != want.ack_policy {
                return Err(NatsError::Conflict(format!(
                    "consumer {name} exists with ack policy {:?}; delete it to recreate",
                    have.ack_policy
                )));
            }
            if !changes.is_empty() {
                let what = format!("consumer {name}: {}", changes.join(", "));
                if nats.apply_topology {
                    stream
                        .update_consumer(want)
                        .await
                        .map_err(|e| js_err(format!("update consumer {name}"))(&e))?;
                    tracing::warn!(change = %what, "consumer settings updated");
                    report.updated.push(what);
                } else {
                    report.differs.push(what);
                }
            }
        }
        Err(_) => {
            // Two processes starting at once may both try: the loser finds it made.
            if let Err(e) = stream.create_consumer(want).await {
                if stream.consumer_info(name).await.is_err() {
                    return Err(js_err(format!("create consumer {name}"))(&e));
                }
            } else {
                report.created.push(format!("consumer {name}"));
            }
        }
    }
    Ok(())
}

/// Desired configuration of the stream capturing max-deliveries advisories.
pub fn advisory_stream_config(cfg: &NatsConfig) -> stream::Config {
    stream::Config {
        name: names::ADVISORY_STREAM.into(),
        description: Some(
            "JetStream max-deliveries advisories of the lipsync work consumers".into(),
        ),
        subjects: vec![names::MAX_DELIVERIES_ADVISORIES.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_messages: 100_000,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

async fn ensure_advisories(
    js: &jetstream::Context,
    nats: &NatsConfig,
    report: &mut BootstrapReport,
) -> Result<(), NatsError> {
    let want = advisory_stream_config(nats);
    let stream = match js.get_stream(names::ADVISORY_STREAM).await {
        Ok(s) => s,
        Err(_) => match js.create_stream(want).await {
            Ok(s) => {
                report
                    .created
                    .push(format!("stream {}", names::ADVISORY_STREAM));
                s
            }
            Err(e) => js
                .get_stream(names::ADVISORY_STREAM)
                .await
                .map_err(|_| js_err("create advisory stream")(&e))?,
        },
    };
    let want = consumer::pull::Config {
        durable_name: Some(names::REAPER_CONSUMER.into()),
        name: Some(names::REAPER_CONSUMER.into()),
        description: Some("fails tasks whose job exhausted its deliveries".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        ..Default::default()
    };
    if stream.consumer_info(names::REAPER_CONSUMER).await.is_err() {
        match stream.create_consumer(want).await {
            Ok(_) => report
                .created
                .push(format!("consumer {}", names::REAPER_CONSUMER)),
            Err(e) => {
                if stream.consumer_info(names::REAPER_CONSUMER).await.is_err() {
                    return Err(js_err("create reaper consumer")(&e));
                }
            }
        }
    }
    Ok(())
}
