#!/usr/bin/env bash
# `make gpu-check`: the infer stage's CUDA path on a machine with an NVIDIA GPU, in one run
# of under 8 minutes on an H100/H200, ending in one table:
#   provider | ms per UNet step, exact and DeepCache 3, fp32 and fp16, at 256 and 512 px |
#   seconds per output second of a 20 s clip through `lipsync-infer bench` | GPU duty cycle
#   (time inside model runs / wall time) | peak VRAM (nvidia-smi, sampled every 100 ms).
# The UNet figures are the tiny profile's graphs (the real contract, small random weights:
# they time the pipeline and the provider, not LatentSync's FLOPs) at the profile's 256 px
# and at 512 px (`bench --resolution 512`). The real architectures' graphs (5 GB each) do
# not fit through 64 MiB runs and their export needs torch: models/README.md has their CPU
# figures; on a GPU machine with the weights, `lipsync-infer bench --deepcache 0,3` times them.
#
# NOT RUN where it was written (no GPU there): a prepared script.
#
# The GPU machine needs no package registry. What it needs, and how it gets there when it
# takes at most 64 MiB of files per run:
#   1. On a machine with PyPI and the Rust toolchain (this repository, `make setup` done):
#        bash stages/infer/gpu_check.sh --pack
#      builds target/release/lipsync-infer with `--features cuda`, writes the tiny fp16
#      profile, downloads the onnxruntime-gpu wheel (and, with PACK_CUDA=1, the CUDA 13 /
#      cuDNN 9 / cuBLAS runtime wheels: about 1.5 GB more, for a machine without them) and
#      cuts all of it into parts of at most 48 MiB: .local/gpu-pack/batch-NN/ (each batch
#      one run's worth) plus .local/gpu-pack/parts.sha256.
#   2. On the GPU machine, one run per batch while it stays warm (files outside the
#      repository survive between runs of a warm machine, not a fresh one):
#        bash stages/infer/gpu_check.sh --receive .local/gpu-pack/batch-01   # carry that folder
#        bash stages/infer/gpu_check.sh --receive .local/gpu-pack/batch-02   # ...
#      Each moves its parts into $GPU_STASH (default /tmp/lipsync-gpu-stash) and prints
#      which are still missing. The onnxruntime-gpu wheel alone is 6 batches.
#   3. Then, in the last run (or together with the last --receive):
#        bash stages/infer/gpu_check.sh
#      It joins and checks the parts (sha256), unzips the wheels (no pip needed), points
#      ORT_DYLIB_PATH / LD_LIBRARY_PATH at them and measures. CUDA 13, cuBLAS 13 and
#      cuDNN 9 already on the machine (system libraries, /usr/local/cuda-13*, or nvidia-*
#      wheels in a Python site-packages) are found and used; what is missing is named.
# On a machine with PyPI, step 1-2 are not needed: `make setup` installs the GPU runtime
# into .venv/ort-gpu and this script uses it (LIPSYNC_GPU_ORT in .local/env.sh).
#
# GPU_CHECK_CPU=1 runs the same measurements on the CPU provider (to check the script
# itself on a machine without a GPU: the table then says cpu and has no VRAM figure).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
PACK="$ROOT/.local/gpu-pack"
STASH="${GPU_STASH:-/tmp/lipsync-gpu-stash}"
PART_BYTES=$((48 * 1024 * 1024))  # + the working tree, under the 64 MiB a run carries
ORT_GPU_VERSION="$(sed -nE 's/^ORT_GPU_VERSION=([0-9.]+).*/\1/p' scripts/setup.sh | head -n 1)"
PY="${LIPSYNC_PYTHON:-python3}"
say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() {
    printf 'gpu-check: ERROR: %s\n' "$*" >&2
    exit 1
}

# Tiny fp16 profile: the tiny graphs converted like the exporter's fp16 (float32 at the
# boundary, Casts inside), under a manifest of its own.
make_tiny_fp16() { # DIR
    local out=$1
    mkdir -p "$out"
    "$PY" - "$ROOT" "$out" <<'PY'
import hashlib, pathlib, sys, tomllib
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
tiny = root / "models/generated/tiny"
lock = ["# tiny profile converted to fp16 by stages/infer/gpu_check.sh", 'precision = "fp16"', ""]
for role in ("vae_encoder", "vae_decoder", "unet", "unet_deepcache_full", "unet_deepcache_shallow", "ddim_step"):
    m = onnx.load(str(tiny / f"{role}.onnx"))
    if role.startswith("unet"):
        m = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=True)
    data = m.SerializeToString()
    (out / f"{role}.onnx").write_bytes(data)
    lock += [f"[models.{role}]", f'file = "{role}.onnx"', f'sha256 = "{hashlib.sha256(data).hexdigest()}"', ""]
mask = (tiny / "mask.png").read_bytes()
(out / "mask.png").write_bytes(mask)
lock += ["[mask]", 'file = "mask.png"', f'sha256 = "{hashlib.sha256(mask).hexdigest()}"', ""]
(out / "manifest.lock.toml").write_text("\n".join(lock))
PY
}

# A manifest with the tiny profile's table under the names tiny (fp32) and tiny-fp16.
write_manifest() { # OUT FP16_DIR
    "$PY" - "$ROOT" "$1" "$2" <<'PY'
import pathlib, sys, tomllib
root, out, fp16 = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
m = tomllib.loads((root / "models/manifest.toml").read_text())
tiny = m["profiles"]["tiny"]
def dump(v):
    if isinstance(v, bool): return "true" if v else "false"
    if isinstance(v, (int, float)): return repr(v)
    if isinstance(v, str): return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list): return "[" + ", ".join(dump(x) for x in v) + "]"
    if isinstance(v, dict): return "{" + ", ".join(f'"{k}" = {dump(x)}' for k, x in v.items()) + "}"
    raise TypeError(v)
lines = [f"schema_version = {m['schema_version']}"]
for name, d in (("tiny", str(root / "models/generated/tiny")), ("tiny-fp16", fp16)):
    p = dict(tiny, dir=d)
    p["models"] = {k: v for k, v in tiny["models"].items() if k != "whisper_encoder"}
    lines.append(f'[profiles."{name}"]')
    lines += [f"{k} = {dump(v)}" for k, v in p.items()]
pathlib.Path(out).write_text("\n".join(lines) + "\n")
PY
}

if [[ "${1:-}" == --pack ]]; then
    [[ -f .local/env.sh ]] && . ./.local/env.sh
    PY="${LIPSYNC_PYTHON:-python3}"
    rm -rf "$PACK" && mkdir -p "$PACK/files"
    say "building lipsync-infer --features cuda (release)"
    cargo build --release -q -p lipsync-infer --features lipsync-infer/cuda
    cp target/release/lipsync-infer "$PACK/files/lipsync-infer"
    make_tiny_fp16 "$PACK/tiny-fp16" && tar -C "$PACK" -czf "$PACK/files/tiny-fp16.tar.gz" tiny-fp16
    tar -C models/generated -czf "$PACK/files/tiny.tar.gz" tiny
    wheels=("onnxruntime-gpu==$ORT_GPU_VERSION")
    if [[ "${PACK_CUDA:-0}" == 1 ]]; then
        wheels+=(nvidia-cuda-runtime~=13.0 nvidia-cublas~=13.0 nvidia-cufft~=12.0 nvidia-curand~=10.0
            nvidia-cuda-nvrtc~=13.0 nvidia-cudnn-cu13~=9.0 nvidia-nvjitlink~=13.0)
    fi
    say "downloading ${wheels[*]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$PACK/files" "${wheels[@]}"
    (cd "$PACK/files" && for f in *; do split -b "$PART_BYTES" -d -a 3 "$f" "../$f.part-"; done)
    (cd "$PACK" && sha256sum files/* | sed 's#files/##' >files.sha256 && rm -rf files tiny-fp16)
    batch=0 used=$PART_BYTES
    for p in "$PACK"/*.part-*; do
        size=$(stat -c %s "$p")
        if ((used + size > PART_BYTES)); then batch=$((batch + 1)) used=0; fi
        d="$PACK/$(printf 'batch-%02d' "$batch")"
        mkdir -p "$d" && mv "$p" "$d/" && used=$((used + size))
    done
    cp "$PACK/files.sha256" "$PACK/batch-01/"
    say "$(ls -d "$PACK"/batch-* | wc -l) batches of at most 48 MiB in $PACK: carry one per run, then --receive it"
    exit 0
fi

if [[ "${1:-}" == --receive ]]; then
    src="${2:?--receive needs the batch folder}"
    mkdir -p "$STASH"
    cp -f "$src"/* "$STASH/"
    if [[ -f "$STASH/files.sha256" ]]; then
        missing=0
        while read -r _ f; do
            ls "$STASH/$f.part-"* >/dev/null 2>&1 || { say "not yet received: $f"; missing=1; }
        done <"$STASH/files.sha256"
        ((missing)) || say "every file has parts here; run without arguments to measure"
    fi
    say "$(ls "$STASH" | wc -l) files in $STASH"
    exit 0
fi

# ------------------------------------------------------------------------- measure
work="$(mktemp -d)"
sampler=""
trap '[[ -n "$sampler" ]] && kill "$sampler" 2>/dev/null; rm -rf "$work"' EXIT
cpu="${GPU_CHECK_CPU:-0}"
[[ -f .local/env.sh ]] && . ./.local/env.sh
bin="${LIPSYNC_INFER_BIN:-}"
if [[ -f "$STASH/files.sha256" ]]; then
    say "joining the received parts in $STASH"
    (cd "$STASH" && while read -r _ f; do cat "$f.part-"* >"$f"; done <files.sha256 && sha256sum -c --quiet files.sha256) ||
        die "parts missing or corrupt in $STASH"
    mkdir -p "$work/gpu"
    for w in "$STASH"/*.whl; do "$PY" -m zipfile -e "$w" "$work/gpu" 2>/dev/null || unzip -q -o "$w" -d "$work/gpu"; done
    tar -C "$work" -xzf "$STASH/tiny.tar.gz" && tar -C "$work" -xzf "$STASH/tiny-fp16.tar.gz"
    mkdir -p models/generated && [[ -d models/generated/tiny ]] || cp -r "$work/tiny" models/generated/tiny
    [[ -n "$bin" ]] || { bin="$work/lipsync-infer" && cp "$STASH/lipsync-infer" "$bin" && chmod +x "$bin"; }
    ort_lib="$(ls "$work"/gpu/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
    ld=""
    for d in "$work"/gpu/nvidia/*/lib; do [[ -d "$d" ]] && ld="$d:$ld"; done
    export ORT_DYLIB_PATH="$ort_lib" LD_LIBRARY_PATH="${ld}${LD_LIBRARY_PATH:-}"
    fp16_dir="$work/tiny-fp16"
else
    if [[ "$cpu" != 1 ]]; then
        [[ -n "${LIPSYNC_GPU_ORT:-}" ]] || die "no GPU runtime: run 'make setup' on this GPU machine, or bring the parts (--pack / --receive)"
        export ORT_DYLIB_PATH="$LIPSYNC_GPU_ORT"
    fi
    if [[ -z "$bin" ]]; then
        feat=()
        [[ "$cpu" == 1 ]] || feat=(--features lipsync-infer/cuda)
        say "building lipsync-infer ${feat[*]} (release)"
        cargo build --release -q -p lipsync-infer "${feat[@]}"
        bin=target/release/lipsync-infer
    fi
    fp16_dir="$work/tiny-fp16"
    make_tiny_fp16 "$fp16_dir"
fi
[[ -f models/generated/tiny/unet_deepcache_full.onnx ]] || die "models/generated/tiny lacks the DeepCache graphs (make setup)"
if [[ "$cpu" != 1 ]]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    # What the CUDA provider will load, and from where.
    for lib in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcufft.so.12 libcurand.so.10 libcudnn.so.9; do
        found="$(for d in ${LD_LIBRARY_PATH//:/ } /usr/local/cuda-13*/lib64 /usr/lib/x86_64-linux-gnu; do
            [[ -e "$d/$lib" ]] && echo "$d" && break; done)"
        [[ -n "$found" ]] || found="$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1==l {print $NF; exit}')"
        say "$lib: ${found:-MISSING (PACK_CUDA=1 --pack brings it)}"
    done
    export LIPSYNC_INFER__DEVICE=cuda   # refuse to fall back to the CPU
else
    export LIPSYNC_INFER__DEVICE=cpu
fi
manifest="$work/manifest.toml"
write_manifest "$manifest" "$fp16_dir"
export LIPSYNC_MODELS__MANIFEST="$manifest" LIPSYNC_LOG__FILTER=warn

ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=640x360:rate=25" -t 4 -pix_fmt yuv420p "$work/clip4.mp4"
ffmpeg -nostdin -v error -y -f lavfi -i "testsrc2=size=1280x720:rate=25" -t 20 -pix_fmt yuv420p "$work/clip20.mp4"
if [[ "$cpu" != 1 ]]; then
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; sleep 0.1; done) \
        >"$work/mem.txt" 2>/dev/null &
    sampler=$!
fi
run() { # NAME PROFILE CLIP RESOLUTION
    LIPSYNC_MODELS__PROFILE="$2" "$bin" bench "$3" --steps 20 --guidance 1.5 --deepcache 0,3 \
        --resolution "$4" >"$work/$1.txt" 2>"$work/$1.err" ||
        { cat "$work/$1.err" >&2; die "bench $1 failed"; }
    say "$1 done"
}
for r in 256 512; do
    run "fp32-$r" tiny "$work/clip4.mp4" "$r"
    run "fp16-$r" tiny-fp16 "$work/clip4.mp4" "$r"
done
run clip20 tiny-fp16 "$work/clip20.mp4" 256
if [[ -n "$sampler" ]]; then kill "$sampler" 2>/dev/null || true; sampler=""; fi
peak="n/a (cpu)"
[[ -s "$work/mem.txt" ]] && peak="$(sort -n "$work/mem.txt" | tail -n 1) MiB (whole GPU)"

"$PY" - "$work" "$peak" <<'PY'
import re, sys, pathlib
work, peak = pathlib.Path(sys.argv[1]), sys.argv[2]
def runs(name):
    t = (work / f"{name}.txt").read_text()
    blocks = re.split(r"^== deepcache interval ", t, flags=re.M)[1:]
    out = {}
    for b in blocks:
        i = int(b.split()[0])
        g = lambda k: float(re.search(k + r"\s+([0-9.]+)", b).group(1))
        out[i] = {"step": g("ms per unet step"), "spos": g("s per output s"), "duty": g("duty cycle")}
    prov = re.search(r"^provider\s+(\S+)", t, re.M).group(1)
    return prov, out
prov, _ = runs("clip20")
rows = [("provider", prov)]
for r in (256, 512):
    for prec in ("fp32", "fp16"):
        _, o = runs(f"{prec}-{r}")
        rows.append((f"ms per UNet step, {r} px {prec}, exact / DeepCache 3",
                     f"{o[0]['step']:.2f} / {o[3]['step']:.2f} ({o[0]['step'] / o[3]['step']:.2f}x)"))
_, o = runs("clip20")
rows.append(("s per output second, 20 s 720p clip, 256 px fp16, exact / DeepCache 3",
             f"{o[0]['spos']:.3f} / {o[3]['spos']:.3f}"))
rows.append(("GPU duty cycle (model time / wall), same runs", f"{o[0]['duty']:.1f} % / {o[3]['duty']:.1f} %"))
rows.append(("peak VRAM", peak))
w = max(len(k) for k, _ in rows)
print("== gpu-check (tiny profile graphs: 20 DDIM steps, CFG batch 2, 16-frame chunks)")
print(f"| {'figure'.ljust(w)} | value |")
print(f"|{'-' * (w + 2)}|-------|")
for k, v in rows:
    print(f"| {k.ljust(w)} | {v} |")
PY
