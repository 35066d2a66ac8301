//! The in-memory task index of one gateway process, fed by ONE watch on `lipsync_tasks`.
//!
//! The watch is `kv.watch_with_history(">")` (deliver policy `LastPerSubject`): it first
//! replays the current value of every key, then streams every change. (`watch_all()`
//! delivers only new changes; `watch_all_from_revision` replays the whole history.) The
//! entry with `seen_current = true` ends the initial load; an empty bucket is loaded at once.
//!
//! The index answers `queue_position` and `GET /queue` (docs/architecture.md §5: tasks not yet on the
//! GPU, ordered by `(start_time, task_id)`, 0-based), serves `GET /task` without a NATS
//! round trip, and fans changes out to WebSockets through a `broadcast` channel: a slow
//! socket lags (and resyncs from KV) instead of blocking the others.
//!
//! Records are applied only when their revision is newer than the cached one, so local
//! writes (applied right after the KV call) and the watch never move a record backwards.
//! KV entries that expire by age produce no watch event, so cached entries older than the
//! bucket's TTL are swept, and at most `MAX_TERMINAL` finished records stay cached (older
//! ones are read from KV on demand).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use lipsync_schemas::TaskRecord;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Finished records kept in memory at most.
const MAX_TERMINAL: usize = 20_000;
/// Capacity of the change channel; a socket further behind lags and resyncs.
const CHANNEL_CAPACITY: usize = 4096;

/// One change of a task record, as broadcast to WebSockets.
#[derive(Debug, Clone)]
pub struct TaskChange {
    /// KV revision of the change.
    pub revision: u64,
    /// Task id.
    pub task_id: String,
    /// The record after the change; `None` when it was deleted.
    pub record: Option<Arc<TaskRecord>>,
}

#[derive(Clone)]
struct Cached {
    record: Arc<TaskRecord>,
    revision: u64,
    seen: Instant,
}

type QueueKey = (u64, String);

fn queue_key(r: &TaskRecord) -> QueueKey {
    // Non-negative finite f64 order like their bit patterns.
    let t = if r.start_time.is_finite() && r.start_time > 0.0 {
        r.start_time
    } else {
        0.0
    };
    (t.to_bits(), r.task_id.clone())
}

#[derive(Default)]
struct State {
    records: HashMap<String, Cached>,
    waiting: BTreeSet<QueueKey>,
    on_gpu: HashSet<String>,
    terminal: VecDeque<String>,
    /// Highest revision removed per key (a late stale write must not resurrect it).
    deleted: HashMap<String, u64>,
}

impl State {
    fn unindex(&mut self, id: &str) {
        if let Some(old) = self.records.remove(id) {
            self.waiting.remove(&queue_key(&old.record));
            self.on_gpu.remove(id);
        }
    }

    /// Returns whether the change was applied (newer than what we had).
    fn apply(&mut self, id: &str, revision: u64, record: Option<Arc<TaskRecord>>) -> bool {
        if let Some(c) = self.records.get(id)
            && c.revision >= revision
        {
            return false;
        }
        if self.deleted.get(id).is_some_and(|r| *r >= revision) {
            return false;
        }
        let was_terminal = self
            .records
            .get(id)
            .is_some_and(|c| c.record.status.is_terminal());
        self.unindex(id);
        let Some(record) = record else {
            self.deleted.insert(id.to_owned(), revision);
            return true;
        };
        if record.waiting_for_gpu() {
            self.waiting.insert(queue_key(&record));
        }
        if record.on_gpu() {
            self.on_gpu.insert(id.to_owned());
        }
        if record.status.is_terminal() && !was_terminal {
            self.terminal.push_back(id.to_owned());
        }
        self.records.insert(
            id.to_owned(),
            Cached {
                record,
                revision,
                seen: Instant::now(),
            },
        );
        while self.terminal.len() > MAX_TERMINAL {
            if let Some(old) = self.terminal.pop_front() {
                self.unindex(&old);
            }
        }
        true
    }
}

fn parse_cursor(c: &str) -> Option<QueueKey> {
    let (bits, id) = c.split_once('.')?;
    Some((u64::from_str_radix(bits, 16).ok()?, id.to_owned()))
}

/// Shared handle on the index.
#[derive(Clone)]
pub struct TaskIndex {
    state: Arc<RwLock<State>>,
    changes_tx: broadcast::Sender<TaskChange>,
    loaded: Arc<AtomicBool>,
    ttl: Duration,
}

/// Snapshot of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Waiting task ids in order.
    pub waiting: Vec<String>,
    /// Whether a task is on the GPU.
    pub is_processing: bool,
}

impl TaskIndex {
    /// An empty index whose cached records expire after `ttl` (the bucket's max age).
    pub fn new(ttl: Duration) -> Self {
        let (changes_tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Self {
            state: Arc::default(),
            changes_tx,
            loaded: Arc::default(),
            ttl,
        }
    }

    /// Subscribe to every applied change.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskChange> {
        self.changes_tx.subscribe()
    }

    /// Whether the initial load finished.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Apply a record (from the watch or a local write); broadcasts it when newer.
    pub fn apply(&self, revision: u64, record: TaskRecord) -> bool {
        let id = record.task_id.clone();
        let record = Arc::new(record);
        let applied = self.write().apply(&id, revision, Some(record.clone()));
        if applied {
            let _ = self.changes_tx.send(TaskChange {
                revision,
                task_id: id,
                record: Some(record),
            });
        }
        applied
    }

    /// Apply a deletion.
    pub fn remove(&self, task_id: &str, revision: u64) {
        if self.write().apply(task_id, revision, None) {
            let _ = self.changes_tx.send(TaskChange {
                revision,
                task_id: task_id.to_owned(),
                record: None,
            });
        }
    }

    /// The cached record and its revision.
    pub fn get(&self, task_id: &str) -> Option<(Arc<TaskRecord>, u64)> {
        let st = self.read();
        let c = st.records.get(task_id)?;
        (c.seen.elapsed() < self.ttl).then(|| (c.record.clone(), c.revision))
    }

    /// 0-based queue position of a waiting task; `None` if it is not waiting or unknown.
    /// Looked up by id: the cached record's own key is used (a record decoded from KV
    /// again may differ in the last bit of `start_time`).
    pub fn position(&self, task_id: &str) -> Option<u64> {
        let st = self.read();
        let key = queue_key(&st.records.get(task_id)?.record);
        if !st.waiting.contains(&key) {
            return None;
        }
        Some(st.waiting.range(..key).count() as u64)
    }

    /// The waiting tasks in order and whether a task is on the GPU.
    pub fn queue(&self) -> QueueSnapshot {
        let st = self.read();
        QueueSnapshot {
            waiting: st.waiting.iter().map(|(_, id)| id.clone()).collect(),
            is_processing: !st.on_gpu.is_empty(),
        }
    }

    /// Every cached non-terminal record (resync of `/ws` clients).
    pub fn active(&self) -> Vec<Arc<TaskRecord>> {
        self.read()
            .records
            .values()
            .filter(|c| !c.record.status.is_terminal())
            .map(|c| c.record.clone())
            .collect()
    }

    /// Number of waiting tasks.
    pub fn queue_length(&self) -> usize {
        self.read().waiting.len()
    }

    /// One page of the cached records `keep` accepts, newest first (by creation time,
    /// then id), starting after `cursor` (the previous page's `next_cursor`). Returns
    /// the page and the cursor of the next one (`None` after the last page).
    pub fn list_page(
        &self,
        keep: impl Fn(&TaskRecord) -> bool,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<TaskRecord>>, Option<String>) {
        let after = cursor.and_then(parse_cursor);
        let mut hits: Vec<(QueueKey, Arc<TaskRecord>)> = {
            let st = self.read();
            st.records
                .values()
                .filter(|c| c.seen.elapsed() < self.ttl && keep(&c.record))
                .map(|c| (queue_key(&c.record), c.record.clone()))
                .filter(|(k, _)| after.as_ref().is_none_or(|a| k < a))
                .collect()
        };
        hits.sort_by(|a, b| b.0.cmp(&a.0));
        let more = hits.len() > limit;
        hits.truncate(limit);
        let next = if more {
            hits.last().map(|(k, _)| format!("{:016x}.{}", k.0, k.1))
        } else {
            None
        };
        (hits.into_iter().map(|(_, r)| r).collect(), next)
    }

    /// Non-terminal cached records `keep` accepts: (queued, processing) counts.
    pub fn count_active(&self, keep: impl Fn(&TaskRecord) -> bool) -> (usize, usize) {
        let st = self.read();
        let mut counts = (0, 0);
        for c in st.records.values() {
            let r = &c.record;
            if r.status.is_terminal() || !keep(r) {
                continue;
            }
            if r.status == lipsync_schemas::Status::Queued {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
        counts
    }

    fn sweep(&self) {
        let mut st = self.write();
        let expired: Vec<String> = st
            .records
            .iter()
            .filter(|(_, c)| c.seen.elapsed() >= self.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            st.unindex(&id);
        }
        let State {
            records, terminal, ..
        } = &mut *st;
        terminal.retain(|id| records.contains_key(id));
        if st.deleted.len() > MAX_TERMINAL {
            st.deleted.clear();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Run the watch until `shutdown`, restarting it after errors. `on_change` is called
    /// for every applied record (webhooks).
    pub async fn run_watch<F>(self, kv: kv::Store, shutdown: CancellationToken, on_change: F)
    where
        F: Fn(&TaskRecord) + Send + 'static,
    {
        let mut backoff = Duration::from_millis(100);
        let mut last_sweep = Instant::now();
        while !shutdown.is_cancelled() {
            match self
                .watch_once(&kv, &shutdown, &on_change, &mut last_sweep)
                .await
            {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, "task watch failed, restarting"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn watch_once<F>(
        &self,
        kv: &kv::Store,
        shutdown: &CancellationToken,
        on_change: &F,
        last_sweep: &mut Instant,
    ) -> Result<(), String>
    where
        F: Fn(&TaskRecord),
    {
        let mut watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        if !self.is_loaded() {
            let status = kv.status().await.map_err(|e| e.to_string())?;
            if status.values() == 0 {
                self.loaded.store(true, Ordering::SeqCst);
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    if last_sweep.elapsed() > Duration::from_secs(60) {
                        self.sweep();
                        *last_sweep = Instant::now();
                    }
                    continue;
                }
                e = watch.next() => e,
            };
            let entry = match entry {
                None => return Err("watch ended".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(entry)) => entry,
            };
            match entry.operation {
                kv::Operation::Put => match serde_json::from_slice::<TaskRecord>(&entry.value) {
                    Ok(rec) => {
                        if self.apply(entry.revision, rec.clone()) {
                            on_change(&rec);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(task_id = %entry.key, error = %e, "undecodable task record")
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    self.remove(&entry.key, entry.revision);
                }
            }
            if entry.seen_current && !self.is_loaded() {
                self.loaded.store(true, Ordering::SeqCst);
                tracing::info!(queue_length = self.queue_length(), "task index loaded");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lipsync_schemas::{InputSource, Stage, StageTiming, Status, TaskRequest};

    fn rec(id: &str, t: f64) -> TaskRecord {
        TaskRecord::new(
            id.into(),
            TaskRequest {
                video: InputSource::Url("http://x/v".into()),
                audio: InputSource::Url("http://x/a".into()),
                model: "tiny".into(),
                inference_steps: 1,
                guidance_scale: 1.0,
                seed: None,
                webhook_url: None,
                output_upload_url: None,
            },
            t,
            String::new(),
        )
    }

    #[test]
    fn positions_follow_start_time_then_id_and_gpu_leaves_the_queue() {
        let idx = TaskIndex::new(Duration::from_secs(3600));
        idx.apply(1, rec("b", 10.0));
        idx.apply(2, rec("a", 10.0));
        idx.apply(3, rec("c", 5.0));
        assert_eq!(idx.queue().waiting, ["c", "a", "b"]);
        assert_eq!(idx.position("b"), Some(2));
        let mut on_gpu = rec("c", 5.0);
        on_gpu.status = Status::Processing;
        on_gpu
            .stages
            .insert(Stage::Infer.as_str().into(), StageTiming::default());
        idx.apply(4, on_gpu.clone());
        let q = idx.queue();
        assert_eq!(q.waiting, ["a", "b"]);
        assert!(q.is_processing);
        assert_eq!(idx.position("c"), None);
        // A stale revision never moves a record backwards.
        assert!(!idx.apply(3, rec("c", 5.0)));
        assert_eq!(idx.queue().waiting, ["a", "b"]);
        idx.remove("a", 9);
        assert_eq!(idx.queue().waiting, ["b"]);
        assert!(!idx.apply(8, rec("a", 10.0)));
    }
}
