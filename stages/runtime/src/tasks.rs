//! Task records in KV `lipsync_tasks`. Every change is a compare-and-set on the entry's
//! revision, so a stale or redelivered attempt can never overwrite a finished task.

use async_nats::jetstream::kv;
use bytes::Bytes;
use lipsync_schemas::{ErrorCode, Stage, StageTiming, Status, TaskError, TaskRecord};

/// How often a CAS update is retried after losing a race.
const CAS_ATTEMPTS: usize = 64;

/// Errors of the task store.
#[derive(Debug, thiserror::Error)]
pub enum TaskStoreError {
    /// NATS could not be reached or refused the call; worth retrying.
    #[error("task store unavailable: {0}")]
    Unavailable(String),
    /// The stored record is not a valid task record.
    #[error("task record {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// A record with this id exists already.
    #[error("task {0} exists already")]
    Exists(String),
    /// Too many concurrent writers.
    #[error("task {0}: too much contention")]
    Contention(String),
}

/// What a mutation closure decided.
pub enum Change {
    /// Write the modified record.
    Write,
    /// Leave the record as it is.
    Skip,
}

/// Result of [`TaskStore::update`].
#[derive(Debug, Clone, PartialEq)]
pub enum Updated {
    /// The record was written; the new version.
    Written(Box<TaskRecord>),
    /// The closure chose not to write (or the record is terminal); the current version.
    Unchanged(Box<TaskRecord>),
    /// No such task.
    Missing,
}

impl Updated {
    /// The record after the call, if the task exists.
    pub fn record(&self) -> Option<&TaskRecord> {
        match self {
            Updated::Written(r) | Updated::Unchanged(r) => Some(r),
            Updated::Missing => None,
        }
    }
}

/// Current time as (epoch seconds, RFC 3339).
pub fn now() -> (f64, String) {
    let t = time::OffsetDateTime::now_utc();
    let epoch = t.unix_timestamp_nanos() as f64 / 1e9;
    let s = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    (epoch, s)
}

/// The task record store.
#[derive(Clone)]
pub struct TaskStore {
    kv: kv::Store,
}

impl TaskStore {
    /// Wrap the `lipsync_tasks` bucket.
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    /// The underlying bucket (the gateway watches it).
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// Create a new record; fails if the id exists.
    pub async fn create(&self, record: &TaskRecord) -> Result<u64, TaskStoreError> {
        let bytes = encode(record);
        self.kv
            .create(&record.task_id, bytes)
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => {
                    TaskStoreError::Exists(record.task_id.clone())
                }
                _ => TaskStoreError::Unavailable(e.to_string()),
            })
    }

    /// Read a record and its revision.
    pub async fn get(&self, task_id: &str) -> Result<Option<(TaskRecord, u64)>, TaskStoreError> {
        if !valid_key(task_id) {
            return Ok(None);
        }
        let entry = self
            .kv
            .entry(task_id)
            .await
            .map_err(|e| TaskStoreError::Unavailable(e.to_string()))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let rec = decode(task_id, &e.value)?;
                Ok(Some((rec, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Apply `f` to the current record with compare-and-set, retrying on conflicts.
    /// `f` is not called for terminal records unless `allow_terminal` is true.
    pub async fn update_with<F>(
        &self,
        task_id: &str,
        allow_terminal: bool,
        mut f: F,
    ) -> Result<Updated, TaskStoreError>
    where
        F: FnMut(&mut TaskRecord) -> Change,
    {
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut rec, rev)) = self.get(task_id).await? else {
                return Ok(Updated::Missing);
            };
            if rec.status.is_terminal() && !allow_terminal {
                return Ok(Updated::Unchanged(Box::new(rec)));
            }
            let before = rec.clone();
            match f(&mut rec) {
                Change::Skip => return Ok(Updated::Unchanged(Box::new(rec))),
                Change::Write if rec == before => return Ok(Updated::Unchanged(Box::new(rec))),
                Change::Write => {}
            }
            match self.kv.update(task_id, encode(&rec), rev).await {
                Ok(_) => return Ok(Updated::Written(Box::new(rec))),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(e) => return Err(TaskStoreError::Unavailable(e.to_string())),
            }
        }
        Err(TaskStoreError::Contention(task_id.to_owned()))
    }

    /// [`Self::update_with`] for non-terminal records.
    pub async fn update<F>(&self, task_id: &str, f: F) -> Result<Updated, TaskStoreError>
    where
        F: FnMut(&mut TaskRecord) -> Change,
    {
        self.update_with(task_id, false, f).await
    }

    /// Record that `stage` started (attempt = delivery count): status `processing`. The
    /// first message to start a stage (`message_seq`, its stream sequence; 0 when
    /// unknown) owns it; a later message for the same stage finds another owner recorded.
    pub async fn mark_started(
        &self,
        task_id: &str,
        stage: Stage,
        attempt: u32,
        message_seq: u64,
    ) -> Result<Updated, TaskStoreError> {
        self.mark_started_on(task_id, stage, attempt, message_seq, None)
            .await
    }

    /// [`TaskStore::mark_started`], also recording the execution provider the stage
    /// runs on (e.g. `cuda:0`, `cpu`) in its timing.
    pub async fn mark_started_on(
        &self,
        task_id: &str,
        stage: Stage,
        attempt: u32,
        message_seq: u64,
        provider: Option<&str>,
    ) -> Result<Updated, TaskStoreError> {
        let (epoch, rfc) = now();
        self.update(task_id, |r| {
            r.status = Status::Processing;
            if r.started_at.is_none() {
                r.started_at = Some(rfc.clone());
            }
            if r.stage.is_none_or(|s| stage_rank(stage) >= stage_rank(s)) {
                r.stage = Some(stage);
            }
            let t = r.stages.entry(stage.as_str().to_owned()).or_default();
            if t.message_seq
                .is_some_and(|s| message_seq != 0 && s != message_seq)
            {
                return Change::Skip;
            }
            if message_seq != 0 {
                t.message_seq = Some(message_seq);
            }
            if t.started_at.is_none() {
                t.started_at = Some(epoch);
            }
            t.attempts = t.attempts.max(attempt);
            if let Some(p) = provider {
                t.provider = Some(p.to_owned());
            }
            r.raise_progress(stage.progress_at(0.0));
            r.message = format!("{stage}: started");
            Change::Write
        })
        .await
    }

    /// Record the stage's progress (fraction of its own work) and a message.
    pub async fn progress(
        &self,
        task_id: &str,
        stage: Stage,
        fraction: f64,
        message: &str,
    ) -> Result<Updated, TaskStoreError> {
        self.update(task_id, |r| {
            let before = r.progress;
            r.raise_progress(stage.progress_at(fraction));
            if r.progress == before && r.message == message {
                return Change::Skip;
            }
            r.message = message.to_owned();
            Change::Write
        })
        .await
    }

    /// Record that `stage` finished its part.
    pub async fn mark_finished(
        &self,
        task_id: &str,
        stage: Stage,
    ) -> Result<Updated, TaskStoreError> {
        let (epoch, _) = now();
        self.update(task_id, |r| {
            let t = r
                .stages
                .entry(stage.as_str().to_owned())
                .or_insert_with(StageTiming::default);
            if t.finished_at.is_some() {
                return Change::Skip;
            }
            t.finished_at = Some(epoch);
            Change::Write
        })
        .await
    }

    /// Fail the task with `error` unless it already ended.
    pub async fn fail(
        &self,
        task_id: &str,
        stage: Option<Stage>,
        error: TaskError,
    ) -> Result<Updated, TaskStoreError> {
        let (epoch, rfc) = now();
        self.update(task_id, |r| {
            r.status = Status::Failed;
            if stage.is_some() {
                r.stage = stage;
            }
            r.message = error.message.clone();
            r.error = Some(error.clone());
            r.finished_at = Some(rfc.clone());
            r.end_time = Some(epoch);
            r.queue_position = None;
            Change::Write
        })
        .await
    }

    /// Ask for cancellation. A task that no stage has picked up yet (or one whose stage
    /// checks later) ends `failed` with code `cancelled`; returns the record after it.
    pub async fn cancel(&self, task_id: &str) -> Result<Updated, TaskStoreError> {
        let (epoch, rfc) = now();
        self.update(task_id, |r| {
            r.cancel_requested = true;
            r.status = Status::Failed;
            r.message = "cancelled by client".into();
            r.error = Some(TaskError::new(ErrorCode::Cancelled, "cancelled by client"));
            r.finished_at = Some(rfc.clone());
            r.end_time = Some(epoch);
            r.queue_position = None;
            Change::Write
        })
        .await
    }
}

/// Order of stages for the `stage` field (face and audio run side by side).
fn stage_rank(s: Stage) -> u8 {
    match s {
        Stage::Fetch => 0,
        Stage::Face | Stage::Audio => 1,
        Stage::Infer => 2,
        Stage::Mux => 3,
    }
}

/// Whether `id` can be a KV key (ids are UUIDs; anything else is simply unknown).
pub fn valid_key(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn encode(r: &TaskRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(r).expect("task record serialises"))
}

fn decode(id: &str, b: &[u8]) -> Result<TaskRecord, TaskStoreError> {
    serde_json::from_slice(b).map_err(|e| TaskStoreError::Corrupt(id.to_owned(), e.to_string()))
}
