//! Scratch folders of the stages: named so that a stage can find and remove what an
//! earlier process of its own left behind (it crashed or was killed mid-job), without
//! touching the live folders of other stages or of other replicas sharing the directory.
//!
//! Names are `lipsync-<stage>-<pid>-<random>`. [`clean_scratch`] removes this stage's
//! entries whose process is gone at once, and entries without a pid
//! (`lipsync-<stage>-<random>`, `lipsync-job-<stage>-<random>`), which may belong to a live
//! replica sharing the directory, only once they are older than [`STALE_AFTER`].

use std::path::Path;
use std::time::Duration;

/// Age after which a scratch entry without a pid in its name counts as left over.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Prefix of a new scratch folder or file of `stage` in this process.
pub fn scratch_prefix(stage: &str) -> String {
    format!("lipsync-{stage}-{}-", std::process::id())
}

fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `name` (last modified `age` ago) is a scratch entry of `stage` left by a
/// process that is gone.
pub fn is_leftover(name: &str, stage: &str, age: Duration) -> bool {
    let ours = format!("lipsync-{stage}-");
    if let Some(rest) = name.strip_prefix(&ours) {
        // `<pid>-<random>`: keep it while that process lives.
        if let Some((pid, _)) = rest.split_once('-')
            && let Ok(pid) = pid.parse::<u32>()
        {
            return !pid_alive(pid);
        }
        return age > STALE_AFTER; // a name without a pid
    }
    name.starts_with(&format!("lipsync-job-{stage}-")) && age > STALE_AFTER
}

/// Removes the scratch entries (folders or files) of `stage` in `dir` that earlier
/// processes left. Run at start-up, before taking work. Returns how many were removed;
/// a missing `dir` is not an error.
pub fn clean_scratch(dir: &Path, stage: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if !is_leftover(name, stage, age) {
            continue;
        }
        let path = e.path();
        let removed = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match removed {
            Ok(()) => n += 1,
            Err(err) => tracing::warn!(error = %err, "could not remove a leftover scratch entry"),
        }
    }
    if n > 0 {
        tracing::info!(stage, removed = n, "removed leftover scratch");
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_this_stages_leftovers() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let dead = 999_999_999u32; // beyond pid_max
        for name in [
            format!("lipsync-mux-{dead}-abc"),
            format!("lipsync-mux-{me}-live"),
            "lipsync-mux-old".to_owned(),
            "lipsync-job-mux-x".to_owned(),
            "lipsync-face-1-x".to_owned(),
            "unrelated".to_owned(),
        ] {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        std::fs::write(d.path().join(format!("lipsync-mux-{dead}-spool")), b"x").unwrap();
        // Entries without a pid are kept while young (a live replica may own them).
        assert_eq!(clean_scratch(d.path(), "mux"), 2);
        assert!(is_leftover("lipsync-mux-old", "mux", STALE_AFTER * 2));
        assert!(is_leftover("lipsync-job-mux-x", "mux", STALE_AFTER * 2));
        assert!(!is_leftover(
            "lipsync-job-mux-x",
            "mux",
            Duration::from_secs(60)
        ));
        assert!(!is_leftover("mux-x", "mux", STALE_AFTER * 2));
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "lipsync-face-1-x".to_owned(),
                "lipsync-job-mux-x".to_owned(),
                format!("lipsync-mux-{me}-live"),
                "lipsync-mux-old".to_owned(),
                "unrelated".to_owned()
            ]
        );
        assert_eq!(clean_scratch(&d.path().join("missing"), "mux"), 0);
    }
}
