//! Every shipped golden fixture parses, and re-serialises to the same JSON value.

use std::path::Path;

use lipsync_schemas::{
    AudioJob, ErrorCode, FaceJob, FetchJob, InferJob, MuxJob, Stage, Status, TaskRecord, WorkItem,
    decode,
};

fn fixtures() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-data");
    let mut out = Vec::new();
    for version in std::fs::read_dir(&root).expect("test-data exists") {
        let version = version.unwrap().path();
        for f in std::fs::read_dir(&version).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(raw: &[u8]) -> T {
    let parsed: T = serde_json::from_slice(raw).expect("fixture parses");
    let again: T = serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
    assert_eq!(
        serde_json::to_value(&parsed).unwrap(),
        serde_json::to_value(&again).unwrap()
    );
    parsed
}

fn check_work<T: WorkItem>(raw: &[u8]) -> T {
    let item: T = decode(raw).expect("work item decodes");
    assert_eq!(item.task_id(), "123e4567-e89b-42d3-a456-426614174000");
    item
}

#[test]
fn every_fixture_parses() {
    let files = fixtures();
    assert!(files.len() >= 8, "fixtures missing: {files:?}");
    for f in files {
        let raw = std::fs::read(&f).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        match name {
            n if n.starts_with("fetch_job") => {
                check_work::<FetchJob>(&raw);
            }
            n if n.starts_with("face_job") => {
                check_work::<FaceJob>(&raw);
            }
            n if n.starts_with("audio_job") => {
                check_work::<AudioJob>(&raw);
            }
            n if n.starts_with("infer_job") => {
                check_work::<InferJob>(&raw);
            }
            n if n.starts_with("mux_job") => {
                check_work::<MuxJob>(&raw);
            }
            n if n.starts_with("task_record") => {
                let r: TaskRecord = roundtrip(&raw);
                assert_eq!(r.schema_version, 1);
            }
            other => panic!("fixture {other} has no parser: add one"),
        }
    }
}

#[test]
fn failed_record_keeps_error_details() {
    let raw = include_bytes!("../test-data/v1/task_record_failed.json");
    let r: TaskRecord = serde_json::from_slice(raw).unwrap();
    assert_eq!(r.status, Status::Failed);
    assert_eq!(r.stage, Some(Stage::Face));
    let e = r.error.unwrap();
    assert_eq!(e.code, ErrorCode::NoFaceDetected);
    assert_eq!(e.frame_index, Some(17));
    assert!(r.join.audio_done && !r.join.face_done);
}

#[test]
fn future_work_version_is_refused() {
    let raw = br#"{"v":99,"task_id":"x","video":"x/input_video"}"#;
    assert!(matches!(
        decode::<FaceJob>(raw),
        Err(lipsync_schemas::DecodeError::UnsupportedVersion(99))
    ));
    assert!(matches!(
        decode::<FaceJob>(b"{not json"),
        Err(lipsync_schemas::DecodeError::Malformed(_))
    ));
}

#[test]
fn error_codes_serialise_as_their_names() {
    for code in ErrorCode::ALL {
        let s = serde_json::to_string(&code).unwrap();
        assert_eq!(s, format!("\"{}\"", code.as_str()));
        let back: ErrorCode = serde_json::from_str(&s).unwrap();
        assert_eq!(back, code);
    }
}

#[test]
fn status_words_are_the_seed_words() {
    let words: Vec<String> = [
        Status::Queued,
        Status::Processing,
        Status::Completed,
        Status::Failed,
    ]
    .iter()
    .map(|s| serde_json::to_string(s).unwrap())
    .collect();
    assert_eq!(
        words,
        [
            "\"queued\"",
            "\"processing\"",
            "\"completed\"",
            "\"failed\""
        ]
    );
}

#[test]
fn progress_bands_are_contiguous_and_monotonic() {
    assert_eq!(Stage::Fetch.progress_at(0.0), 0.0);
    assert!((Stage::Fetch.progress_at(1.0) - Stage::Face.progress_at(0.0)).abs() < 1e-12);
    assert!((Stage::Audio.progress_at(1.0) - Stage::Infer.progress_at(0.0)).abs() < 1e-12);
    assert!((Stage::Infer.progress_at(1.0) - Stage::Mux.progress_at(0.0)).abs() < 1e-12);
    assert_eq!(Stage::Mux.progress_at(1.0), 1.0);
    assert_eq!(
        Stage::Infer.progress_at(f64::NAN),
        Stage::Infer.progress_at(0.0)
    );
}

#[test]
fn progress_never_goes_backwards() {
    let raw = include_bytes!("../test-data/v1/task_record_queued.json");
    let mut r: TaskRecord = serde_json::from_slice(raw).unwrap();
    r.raise_progress(0.5);
    r.raise_progress(0.2);
    r.raise_progress(f64::NAN);
    assert_eq!(r.progress, 0.5);
    r.raise_progress(7.0);
    assert_eq!(r.progress, 1.0);
}
