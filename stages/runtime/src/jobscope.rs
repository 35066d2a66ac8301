//! The processes a job started. Tool processes (ffmpeg, ffprobe) register themselves with
//! the job they run for, so that aborting a stalled or interrupted job kills them too
//! and the blocking code reading their output returns at once.
//!
//! The job is found without passing it around: the runner sets it for the handler's async
//! task, and [`crate::JobCtx::run_blocking`] sets it for the blocking thread it starts.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The live child processes of one job.
#[derive(Debug, Default)]
pub struct Children(Mutex<HashSet<u32>>);

impl Children {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of registered processes.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no process is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// SIGKILL every registered process; returns how many were signalled.
    pub fn kill_all(&self) -> usize {
        let pids: Vec<u32> = self.lock().drain().collect();
        let mut n = 0;
        for pid in pids {
            let Some(p) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            else {
                continue;
            };
            if rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok() {
                n += 1;
            }
        }
        n
    }
}

thread_local! {
    static THREAD_JOB: RefCell<Option<Arc<Children>>> = const { RefCell::new(None) };
}

tokio::task_local! {
    static TASK_JOB: Arc<Children>;
}

/// A registered child; dropping it (after the child was waited for) unregisters it.
#[derive(Debug)]
pub struct Tracked {
    pid: u32,
    owner: Option<Arc<Children>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(o) = &self.owner {
            o.lock().remove(&self.pid);
        }
    }
}

/// Register process `pid` with the job running on this task or thread, if any. Keep the
/// returned guard as long as the process may run.
pub fn track(pid: u32) -> Tracked {
    let owner = TASK_JOB
        .try_with(Arc::clone)
        .ok()
        .or_else(|| THREAD_JOB.with(|c| c.borrow().clone()));
    if let Some(o) = &owner {
        o.lock().insert(pid);
    }
    Tracked { pid, owner }
}

/// Run `fut` as part of the job that owns `children`.
pub async fn scope<F: std::future::Future>(children: Arc<Children>, fut: F) -> F::Output {
    TASK_JOB.scope(children, fut).await
}

/// The job of the current async task, if any (to hand to a blocking thread).
pub fn current() -> Option<Arc<Children>> {
    TASK_JOB
        .try_with(Arc::clone)
        .ok()
        .or_else(|| THREAD_JOB.with(|c| c.borrow().clone()))
}

/// Marks the current thread as working for a job until dropped.
pub struct ThreadScope(Option<Arc<Children>>);

/// Make the current (blocking) thread part of the job that owns `children`.
pub fn enter_thread(children: Option<Arc<Children>>) -> ThreadScope {
    let prev = THREAD_JOB.with(|c| std::mem::replace(&mut *c.borrow_mut(), children));
    ThreadScope(prev)
}

impl Drop for ThreadScope {
    fn drop(&mut self) {
        let prev = self.0.take();
        THREAD_JOB.with(|c| *c.borrow_mut() = prev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_scope_tracks_and_kills_its_children() {
        let children = Arc::new(Children::default());
        let _scope = enter_thread(Some(children.clone()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let tracked = track(child.id());
        assert_eq!(children.len(), 1);
        assert_eq!(children.kill_all(), 1);
        let status = child.wait().expect("wait");
        assert!(!status.success(), "sleep was not killed: {status}");
        drop(tracked);
        assert!(children.is_empty());
    }

    #[test]
    fn outside_a_job_nothing_is_tracked() {
        let t = track(1);
        assert!(t.owner.is_none());
    }

    #[tokio::test]
    async fn the_task_scope_reaches_spawned_helpers() {
        let children = Arc::new(Children::default());
        scope(children.clone(), async {
            let _t = track(4242);
            assert_eq!(current().map(|c| c.len()), Some(1));
        })
        .await;
        assert!(children.is_empty());
    }
}
