#!/usr/bin/env python3
"""Stage-by-stage parity of our pipeline against LatentSync's own code (`make parity`).

  python scripts/parity/parity.py --latentsync-src DIR [--models DIR] [--out DIR]

Runs the reference's `LipsyncPipeline.__call__` (imported from a LatentSync checkout at
commit a229c39, never copied here) on CPU in fp32 with the random weights of our
`make models-check` export (the PyTorch modules are rebuilt by models/export/export.py
with the seed in the export's lock file), then our own stage functions through the
`parity` binary (tests/src/bin/parity.rs) on the same decoded frames, the same audio, the
same alignment anchors, the same initial noise and the same VAE posterior noise, and
prints one table of max abs error / PSNR / SSIM per stage.

What the reference cannot run here is replaced at its boundary only:
- face detection (InsightFace, CUDA): a detector stub returns 106 points whose means are
  the given anchors, so `ImageProcessor.affine_transform` and everything after it is the
  reference's code;
- `read_video` / `read_audio` (decord, ffmpeg): return the harness's arrays;
- `AlignRestore` runs on the CPU in fp32 (the reference builds it for CUDA in fp16);
- the final `write_video` and ffmpeg mux: skipped (the restored frames are compared).
Every intermediate is recorded by wrapping the pipeline's own methods.

Our side (`parity audio` / `parity video`) calls the stage crates' public functions: mel and
encoder windows (audio), the aligner (face), warp, mask, VAE/DDIM/VAE through the engine,
paste-back (infer) and the blender (mux). The crops artifact's codec is left out (its
lossless `ffv1` setting returns the pasted crops unchanged); the VAE uses the posterior
sample with the reference's draws (our default is the mean); the restore runs both with
the reference's edge and with ours.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import pickle
import subprocess
import sys
import time
import types
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "a229c3948406bc2cf6eaf4873e662e70c6a04746"
PROFILE = "latentsync-1.5"
RES = 256
N_FRAMES = 8
FRAMES_PER_CHUNK = 3
STEPS = 2
GUIDANCE = 1.5
# The test portrait and its alignment anchors (left brow, right brow, nose centroid; read
# off the image, stages/face/README.md); each frame shifts the image and the anchors.
PORTRAIT = ROOT / "tests" / "assets" / "generated" / "astronaut.png"
ANCHORS = np.array([[202.5, 90.3], [250.0, 91.5], [224.0, 122.5]])
SHIFTS = [(k * 1.5 % 5, (k * 0.7) % 3) for k in range(N_FRAMES)]  # sub-pixel anchor jitter
SPEECH = ROOT / "tests" / "assets" / "generated" / "speech_16k.wav"
AUDIO_START, AUDIO_SAMPLES = 16000, 4000  # 0.25 s: 25 mel frames -> T = 12 -> 8 chunks


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------


def stub(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def import_reference(src: Path):
    """Import LatentSync's pipeline with its heavy, unused imports stubbed (decord,
    matplotlib, insightface, ffmpeg-python, soundfile, transformers' tokenizer)."""
    sys.path.insert(0, str(src))
    stub("latentsync.utils.util", zero_rank_log=lambda logger, msg: logger.info(msg),
         read_video=None, read_audio=None, write_video=None, check_ffmpeg_installed=lambda: None)
    stub("latentsync.utils.face_detector", FaceDetector=None)
    stub("latentsync.whisper.whisper.tokenizer", Tokenizer=None, get_tokenizer=None,
         LANGUAGES={}, TO_LANGUAGE_CODE={})
    if "ffmpeg" not in sys.modules:
        stub("ffmpeg")
    stub("soundfile", write=lambda *a, **k: None)
    lp = importlib.import_module("latentsync.pipelines.lipsync_pipeline")
    wm = importlib.import_module("latentsync.whisper.whisper.model")
    audio = importlib.import_module("latentsync.whisper.whisper.audio")
    a2f = importlib.import_module("latentsync.whisper.audio2feature")
    unet_mod = importlib.import_module("latentsync.models.unet")
    at = importlib.import_module("latentsync.utils.affine_transform")
    return lp, wm, audio, a2f, unet_mod, at


def run_reference(src: Path, seed: int, frames: np.ndarray, anchors: np.ndarray, pcm: np.ndarray,
                  tmp: Path, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    lp, wm, whisper_audio, a2f, unet_mod, at = import_reference(src)
    sys.path.insert(0, str(ROOT / "models" / "export"))
    import export  # noqa: E402  (our exporter: the same modules, the same seeded weights)

    t0 = time.time()
    args = argparse.Namespace(seed=seed, only=None, random_weights=True, latentsync_src=str(src),
                              profile=PROFILE)
    mods = export.build_modules(args, wm, unet_mod)
    log(f"reference: modules rebuilt with seed {seed} in {time.time() - t0:.1f} s")

    from diffusers import DDIMScheduler
    import diffusers.models.autoencoders.vae as vae_mod

    rec: dict = {"vae_noise": [], "steps": [], "masks": [], "masked": [], "ref_px": [],
                 "vae_masked": [], "vae_ref": [], "pasted": []}

    # The VAE posterior draws (DiagonalGaussianDistribution.sample), in call order.
    orig_randn = vae_mod.randn_tensor

    def randn_rec(*a, **k):
        x = orig_randn(*a, **k)
        rec["vae_noise"].append(x.clone())
        return x

    vae_mod.randn_tensor = randn_rec

    vae = mods["vae_encoder"].vae
    vae.config.scaling_factor = 0.18215  # as scripts/inference.py sets them
    vae.config.shift_factor = 0
    whisper = wm.Whisper(wm.ModelDimensions(**export.WHISPER_TINY_DIMS))
    whisper.encoder = mods["whisper_encoder"].enc
    whisper.eval()
    audio_encoder = a2f.Audio2Feature.__new__(a2f.Audio2Feature)
    audio_encoder.model = whisper
    audio_encoder.audio_embeds_cache_dir = None
    audio_encoder.num_frames = 16
    audio_encoder.embedding_dim = whisper.dims.n_audio_state
    audio_encoder.audio_feat_length = [2, 2]
    scheduler = DDIMScheduler.from_pretrained(str(src / "configs"))
    pipe = lp.LipsyncPipeline(vae=vae, audio_encoder=audio_encoder, unet=mods["unet"].unet, scheduler=scheduler)

    queue = list(anchors)

    class Detector:
        """106 points whose brow / nose means are the next frame's anchors."""

        def __call__(self, image):
            a = queue.pop(0)
            lm = np.zeros((106, 2))
            lm[[43, 48, 49, 51, 50]] = a[0]
            lm[101:106] = a[1]
            lm[[74, 77, 83, 86]] = a[2]
            return [0, 0, 1, 1], lm

    base = lp.ImageProcessor

    class Processor(base):
        def __init__(self, resolution, device="cpu", mask_image=None):
            super().__init__(resolution, device="cpu", mask_image=mask_image)
            self.restorer = at.AlignRestore(resolution=resolution, device="cpu", dtype=torch.float32)
            self.face_detector = Detector()

        def prepare_masks_and_masked_images(self, images, affine_transform=False):
            px, masked, masks = super().prepare_masks_and_masked_images(images, affine_transform)
            rec["ref_px"].append(px.clone())
            rec["masked"].append(masked.clone())
            rec["masks"].append(masks.clone())
            return px, masked, masks

    lp.ImageProcessor = Processor
    lp.read_video = lambda path, use_decord=False: frames.copy()
    lp.read_audio = lambda path: torch.from_numpy(pcm.copy())
    lp.write_video = lambda *a, **k: None
    lp.subprocess = types.SimpleNamespace(run=lambda *a, **k: None)

    def wrap(name, after):
        orig = getattr(pipe, name)

        def f(*a, **k):
            out = orig(*a, **k)
            after(out)
            return out

        setattr(pipe, name, f)

    wrap("prepare_latents", lambda out: rec.__setitem__("noise", out[0, :, 0].clone()))
    wrap("prepare_mask_latents", lambda out: rec["vae_masked"].append(out[1][0].clone()))
    wrap("prepare_image_latents", lambda out: rec["vae_ref"].append(out[0].clone()))
    wrap("paste_surrounding_pixels_back", lambda out: rec["pasted"].append(out.clone()))
    wrap("affine_transform_video", lambda out: rec.update(faces=out[0].clone(), affine=[m.clone() for m in out[2]]))
    wrap("restore_video", lambda out: rec.__setitem__("restored", out.copy()))
    ae_feat = audio_encoder.audio2feat
    audio_encoder.audio2feat = lambda p: rec.setdefault("features", ae_feat(p))
    ae_chunks = audio_encoder.feature2chunks
    audio_encoder.feature2chunks = lambda **k: rec.setdefault("chunks", ae_chunks(**k))

    def callback(j, t, latents):
        rec["steps"].append((int(t), latents[0].clone()))

    t0 = time.time()
    pipe(video_path="frames", audio_path=pcm, video_out_path=str(tmp / "reference.mp4"),
         num_frames=FRAMES_PER_CHUNK, video_fps=25, audio_sample_rate=16000, height=RES, width=RES,
         num_inference_steps=STEPS, guidance_scale=GUIDANCE, weight_dtype=torch.float32, eta=0.0,
         mask_image_path=str(src / "latentsync" / "utils" / "mask.png"), temp_dir=str(tmp / "temp"),
         generator=torch.Generator().manual_seed(seed), callback=callback, callback_steps=1)
    log(f"reference: LipsyncPipeline.__call__ in {time.time() - t0:.1f} s")
    rec["mel"] = whisper_audio.log_mel_spectrogram(torch.from_numpy(pcm.copy())).numpy()
    vae_mod.randn_tensor = orig_randn
    return rec


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def _gauss(n=11, sigma=1.5):
    x = np.arange(n) - n // 2
    g = np.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def _filt(img, g):
    # separable 'valid' Gaussian filter over the last two axes
    a = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), -1, img)
    return np.apply_along_axis(lambda c: np.convolve(c, g, mode="valid"), -2, a)


def ssim(ref: np.ndarray, got: np.ndarray, data_range: float) -> float | None:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) over the planes
    formed by the last two axes; None when a plane is smaller than the window."""
    if ref.ndim < 2 or min(ref.shape[-2:]) < 11:
        return None
    x = ref.reshape(-1, *ref.shape[-2:]).astype(np.float64)
    y = got.reshape(-1, *got.shape[-2:]).astype(np.float64)
    g = _gauss()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for a, b in zip(x, y):
        mx, my = _filt(a, g), _filt(b, g)
        sxx = _filt(a * a, g) - mx * mx
        syy = _filt(b * b, g) - my * my
        sxy = _filt(a * b, g) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def compare(name: str, ref, got, peak: float | None = None, planes=None, tol=None) -> dict:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return {"stage": name, "shape": f"{ref.shape} vs {got.shape}", "error": "shape differs"}
    rng = float(ref.max() - ref.min()) if peak is None else peak
    rng = rng if rng > 0 else 1.0
    d = np.abs(ref - got)
    mse = float((d * d).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(rng * rng / mse)
    p = ref if planes is None else planes(ref)
    q = got if planes is None else planes(got)
    s = ssim(p, q, rng)
    row = {"stage": name, "shape": "x".join(map(str, ref.shape)), "peak": rng, "max_abs": float(d.max()),
           "psnr": psnr, "ssim": s}
    if tol is not None:
        row["ok"] = tol(row)
    return row


# ------------------------------------------------------------------------------------------


def load_inputs():
    from PIL import Image

    img = np.asarray(Image.open(PORTRAIT).convert("RGB"))
    h, w, _ = img.shape
    frames, anchors = [], []
    for k in range(N_FRAMES):
        dx, dy = k % 3, k // 3  # whole-pixel shift of the picture (edge replicated)
        f = np.pad(img, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:h, :w]
        frames.append(f)
        jx, jy = SHIFTS[k]
        anchors.append(ANCHORS + [dx + 0.3 * jx, dy + 0.3 * jy])
    with wave.open(str(SPEECH)) as wf:
        assert wf.getframerate() == 16000 and wf.getsampwidth() == 2 and wf.getnchannels() == 1
        raw = wf.readframes(wf.getnframes())
    pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    pcm = np.ascontiguousarray(pcm[AUDIO_START:AUDIO_START + AUDIO_SAMPLES])
    return np.stack(frames).astype(np.uint8), np.array(anchors), pcm


def read_lock(models: Path) -> dict:
    out = {}
    for line in (models / "manifest.lock.toml").read_text().splitlines():
        if line.startswith("["):
            break
        if "=" in line:
            k, v = (s.strip() for s in line.split("=", 1))
            out[k] = v.strip('"')
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latentsync-src", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=ROOT / ".local" / "models-check" / f"{PROFILE}-fp32")
    ap.add_argument("--out", type=Path, default=ROOT / ".local" / "parity")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "debug" / "parity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    ap.add_argument("--reuse-reference", action="store_true",
                    help="compare against the reference run saved in --out by an earlier run (reference.pkl)")
    args = ap.parse_args(argv)

    src = args.latentsync_src.resolve()
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or head.stdout.strip() != COMMIT:
        sys.exit(f"parity: {src} must be a LatentSync checkout at commit {COMMIT[:7]} "
                 f"(found {head.stdout.strip()[:7] or 'no git checkout'}); "
                 f"run: git -C {src} checkout {COMMIT[:7]}")
    lock = read_lock(args.models)
    if lock.get("random_weights") != "true" or lock.get("precision") != "fp32" or lock.get("profile") != PROFILE:
        sys.exit(f"parity: {args.models} is not the fp32 random-weight export of {PROFILE} (make models-check)")
    seed = int(lock["seed"])
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    frames, anchors, pcm = load_inputs()
    anchors_r = np.round(anchors)  # the reference rounds its anchors (np.round, half to even)
    t_all = time.time()
    saved = out / "reference.pkl"
    if args.reuse_reference:
        import torch  # noqa: F401  (the saved tensors)

        with open(saved, "rb") as f:
            rec = pickle.load(f)
        log(f"reference: reusing {saved}")
    else:
        rec = run_reference(src, seed, frames, anchors, pcm, out, args.threads)
        import gc

        gc.collect()  # the reference's modules (5 GB in fp32) go before our side loads its own
        with open(saved, "wb") as f:
            pickle.dump(rec, f)

    n, h, w, _ = frames.shape
    lat = RES // 8
    # VAE draws in call order: per chunk the masked crops' posterior, then the reference's.
    eps = [e.numpy() for e in rec["vae_noise"]]
    assert len(eps) == 2 * len(rec["vae_masked"]), len(eps)
    cfg = {"manifest": str(ROOT / "models" / "manifest.toml"), "profile": PROFILE, "models_dir": str(args.models),
           "threads": args.threads, "frames": n, "width": w, "height": h, "steps": STEPS, "guidance": GUIDANCE,
           "frames_per_chunk": FRAMES_PER_CHUNK}
    (out / "config.json").write_text(json.dumps(cfg))
    pcm.astype("<f4").tofile(out / "pcm.f32")
    frames.tofile(out / "frames.u8")
    anchors_r.astype("<f8").tofile(out / "anchors.f64")
    rec["noise"].numpy().astype("<f4").tofile(out / "noise.f32")
    np.concatenate(eps[0::2]).astype("<f4").tofile(out / "vae_eps_masked.f32")
    np.concatenate(eps[1::2]).astype("<f4").tofile(out / "vae_eps_reference.f32")
    t0 = time.time()
    for cmd in ("audio", "video"):
        subprocess.run([str(args.bin), cmd, str(out)], check=True)
    log(f"ours: parity audio + video in {time.time() - t0:.1f} s")

    rd = lambda name, dt, shape: np.fromfile(out / name, dtype=dt).reshape(shape)  # noqa: E731
    meta = json.loads((out / "audio.json").read_text())
    rows = []
    img_tol = lambda r: r["psnr"] >= 40 and (r["ssim"] is None or r["ssim"] >= 0.99)  # noqa: E731
    close = lambda r: r["max_abs"] <= 1e-3 * r["peak"]  # noqa: E731

    mel_ref = rec["mel"]
    rows.append(compare("log-mel (80 x frames)", mel_ref, rd("mel.f32", "<f4", (80, meta["mel_frames"])), tol=close))
    f_ref = rec["features"].numpy()
    f_got = rd("features.f32", "<f4", (meta["t"], 5, 384))
    rows.append(compare("encoder features (T x 5 x 384)", f_ref, f_got, planes=lambda a: a.transpose(1, 0, 2), tol=close))
    c_ref = torch_stack(rec["chunks"])
    c_got = rd("chunks.f32", "<f4", (meta["chunks"], 50, 384))
    if c_ref.shape[0] != c_got.shape[0]:
        rows.append({"stage": "per-frame audio chunks", "error": f"{c_ref.shape[0]} vs {c_got.shape[0]} chunks"})
    rows.append(compare("per-frame audio chunks (50 x 384)", c_ref[:n], c_got[:n], tol=close))
    a_ref = np.stack([m.numpy().reshape(2, 3) for m in rec["affine"]])
    rows.append(compare("affine matrices (2 x 3)", a_ref, rd("affine.f64", "<f8", (n, 2, 3)),
                        tol=lambda r: r["max_abs"] <= 1e-6 * r["peak"]))  # float32 rounding of the reference
    crops_ref = rec["faces"].numpy().transpose(0, 2, 3, 1)
    crops_got = rd("crops.u8", "u1", (n, RES, RES, 3))
    hwc = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731  (SSIM per colour plane)
    rows.append(compare("warped crops (R x R, 0..255)", crops_ref, crops_got, peak=255, planes=hwc, tol=img_tol))
    mask_ref = rec["masks"][0].numpy()[0, 0]
    rows.append(compare("keep-mask (R x R)", mask_ref, rd("mask.f32", "<f4", (RES, RES)), peak=1, tol=close))
    m_ref = torch_cat(rec["masked"])
    rows.append(compare("masked images ([-1,1])", m_ref, rd("masked.f32", "<f4", (n, 3, RES, RES)), peak=2, tol=img_tol))
    p_ref = torch_cat(rec["ref_px"])
    rows.append(compare("reference images ([-1,1])", p_ref, rd("reference.f32", "<f4", (n, 3, RES, RES)), peak=2, tol=img_tol))
    ranges = [(a, min(a + FRAMES_PER_CHUNK, n)) for a in range(0, n, FRAMES_PER_CHUNK)]

    def per_chunk(name, parts):
        got = np.fromfile(out / name, dtype="<f4")
        ref = np.concatenate([p.numpy().reshape(-1) for p in parts])
        return ref, got

    ref, got = per_chunk("vae_masked.f32", rec["vae_masked"])
    rows.append(compare("VAE latents, masked (x0.18215)", ref.reshape(-1, lat, lat), got.reshape(-1, lat, lat), tol=close))
    ref, got = per_chunk("vae_reference.f32", rec["vae_ref"])
    rows.append(compare("VAE latents, reference (x0.18215)", ref.reshape(-1, lat, lat), got.reshape(-1, lat, lat), tol=close))
    for j in range(STEPS):
        after_j = [s[1] for i, s in enumerate(rec["steps"]) if i % STEPS == j]
        ref, got = per_chunk(f"step{j + 1}.f32", after_j)
        rows.append(compare(f"latents after DDIM step {j + 1} of {STEPS}", ref.reshape(-1, lat, lat), got.reshape(-1, lat, lat), tol=close))
    pasted_ref = torch_cat(rec["pasted"]).transpose(0, 2, 3, 1)
    pasted_ref = np.clip(pasted_ref / 2 + 0.5, 0, 1) * 255  # the reference's float face in 0..255
    rows.append(compare("decoded faces after paste-back (0..255)", pasted_ref, rd("pasted.u8", "u1", (n, RES, RES, 3)),
                        peak=255, planes=hwc, tol=img_tol))
    restored_ref = rec["restored"]
    for name, label in (("restored_refedge.u8", "restored frames (reference edge)"),
                        ("restored.u8", "restored frames (our edge, default)")):
        rows.append(compare(label, restored_ref, rd(name, "u1", (n, h, w, 3)), peak=255, planes=hwc, tol=img_tol))
    log(f"total {time.time() - t_all:.1f} s")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def torch_stack(xs):
    return np.stack([x.numpy() for x in xs])


def torch_cat(xs):
    return np.concatenate([x.numpy() for x in xs])


def print_table(rows) -> None:
    log("")
    log("| stage | shape | max abs error | PSNR dB (peak) | SSIM | within tolerance |")
    log("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            log(f"| {r['stage']} | {r.get('shape', '')} | {r['error']} | | | |")
            continue
        psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.1f}"
        ssim_s = "-" if r["ssim"] is None else f"{r['ssim']:.5f}"
        ok = {True: "yes", False: "**no**", None: ""}[r.get("ok")]
        log(f"| {r['stage']} | {r['shape']} | {r['max_abs']:.3g} | {psnr} ({r['peak']:.3g}) | {ssim_s} | {ok} |")


if __name__ == "__main__":
    sys.exit(main())
