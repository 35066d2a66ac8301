//! Provider selection on this binary's real ONNX Runtime: `auto` refuses a real profile
//! without CUDA, explicit `cpu` runs it (loudly), `tiny` runs on the CPU under `auto`; the
//! provider shows in `lipsync_infer_provider` and in `provider_info()`. The "real" profile
//! here is the tiny models under a manifest entry marked `real = true`.

use std::path::{Path, PathBuf};

use lipsync_infer::InferStage;
use lipsync_runtime::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A manifest whose `latentsync-1.5` is the tiny profile's files with `real = true`.
fn real_fixture(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("models/manifest.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    let mut tiny = manifest["profiles"]["tiny"].as_table().unwrap().clone();
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let src = root().join("models/generated/tiny");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        // Without the DeepCache pair: a profile exported before it existed.
        if !name.starts_with("unet_deepcache") && !name.starts_with('.') {
            std::fs::copy(e.path(), files.join(&name)).unwrap();
        }
    }
    tiny.insert("real".into(), true.into());
    tiny.insert("dir".into(), files.display().to_string().into());
    let mut profiles = toml::Table::new();
    profiles.insert("latentsync-1.5".into(), tiny.into());
    let mut out = toml::Table::new();
    out.insert("schema_version".into(), manifest["schema_version"].clone());
    out.insert("profiles".into(), profiles.into());
    let path = dir.join("manifest.toml");
    std::fs::write(&path, toml::to_string(&out).unwrap()).unwrap();
    path
}

fn config(manifest: PathBuf, profile: &str, device: &str) -> Config {
    let mut cfg = Config::default();
    cfg.models.profile = profile.into();
    cfg.models.manifest = manifest;
    cfg.infer.device = device.into();
    cfg.infer.intra_threads = 1;
    cfg
}

/// The value of `lipsync_infer_provider{provider, profile, real}`, if exported.
fn provider_series(provider: &str, profile: &str, real: &str) -> Option<f64> {
    prometheus::gather()
        .into_iter()
        .find(|f| f.name() == "lipsync_infer_provider")?
        .get_metric()
        .iter()
        .find(|m| {
            let l: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            l.contains(&("provider", provider))
                && l.contains(&("profile", profile))
                && l.contains(&("real", real))
        })
        .map(|m| m.get_gauge().get_value())
}

#[test]
fn auto_without_cuda_refuses_a_real_profile() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build on a GPU machine would rightly start
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(real_fixture(dir.path()), "latentsync-1.5", "auto");
    let err = InferStage::new(&cfg).err().expect("must refuse to start");
    let msg = err.to_string();
    assert!(msg.contains("infer.device = cpu"), "{msg}");
    assert!(msg.contains("latentsync-1.5"), "{msg}");
    assert!(msg.contains("cuda"), "{msg}");
    assert!(lipsync_infer::engine::provider_info().is_none());
}

#[test]
fn explicit_cpu_runs_a_real_profile_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(real_fixture(dir.path()), "latentsync-1.5", "cpu");
    let stage = InferStage::new(&cfg).expect("explicit cpu starts");
    assert_eq!(stage.provider(), "cpu");
    assert_eq!(
        provider_series("cpu", "latentsync-1.5", "true"),
        Some(1.0),
        "the alert's series"
    );
    let info = lipsync_infer::engine::provider_info().expect("info");
    assert_eq!((info.provider.as_str(), info.real), ("cpu", true));
}

#[test]
fn tiny_runs_on_the_cpu_under_auto() {
    let cfg = config(root().join("models/manifest.toml"), "tiny", "auto");
    let stage = InferStage::new(&cfg).expect("tiny starts on the CPU");
    if !cfg!(feature = "cuda") {
        assert_eq!(stage.provider(), "cpu");
        assert_eq!(provider_series("cpu", "tiny", "false"), Some(1.0));
    }
    let info = lipsync_infer::engine::provider_info().expect("info");
    assert!(!info.real);
    assert_eq!(info.deepcache_interval, 0);
}

#[test]
fn cuda_without_cuda_refuses_even_tiny() {
    if cfg!(feature = "cuda") {
        return;
    }
    let cfg = config(root().join("models/manifest.toml"), "tiny", "cuda");
    let err = InferStage::new(&cfg).err().expect("must refuse");
    assert!(err.to_string().contains("infer.device = cuda"), "{err}");
}
