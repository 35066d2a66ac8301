#!/usr/bin/env bash
# scripts/lint-gpu.sh: the GPU pieces agree with each other (run by `make lint`).
#
#   1. deploy/compose/onnxruntime-gpu.metadata (the Requires-Dist of the onnxruntime-gpu
#      wheel, as its PyPI metadata states them) names the same version as the Dockerfile's
#      ORT_VERSION and scripts/setup.sh's ORT_GPU_VERSION.
#   2. The CUDA major of the Dockerfile's CUDA_IMAGE equals the major of the wheel's
#      `nvidia-cuda-runtime~=N.x` requirement, the image is a cuDNN image, and the cuDNN
#      wheel the metadata names is built for that CUDA major (`nvidia-cudnn-cuN`); the
#      cuBLAS pin in setup.sh has the same major.
#   3. When PyPI is reachable, the recorded metadata equals the live one (pip fetches only
#      the wheel's METADATA file, a few kB). Offline, step 3 says so and 1-2 still run
#      against the recorded copy: the check never needs the network to pass.
#   4. promtool check/test of the infer provider alert rules (promtool as installed by
#      scripts/lint-deploy.sh, if present).
#
#   bash scripts/lint-gpu.sh            # check
#   bash scripts/lint-gpu.sh --refresh  # rewrite the metadata file from PyPI (after a pin change)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
META=deploy/compose/onnxruntime-gpu.metadata
DOCKERFILE=deploy/compose/Dockerfile
PY="${LIPSYNC_PYTHON:-python3}"

say() { printf 'lint-gpu: %s\n' "$*" >&2; }
die() {
    printf 'lint-gpu: ERROR: %s\n' "$*" >&2
    exit 1
}

docker_ort="$(sed -nE 's/^ARG ORT_VERSION=([0-9.]+).*/\1/p' "$DOCKERFILE" | head -n 1)"
cuda_image="$(sed -nE 's/^ARG CUDA_IMAGE=(.+)$/\1/p' "$DOCKERFILE" | head -n 1)"
setup_ort="$(sed -nE 's/^ORT_GPU_VERSION=([0-9.]+).*/\1/p' scripts/setup.sh | head -n 1)"
setup_cublas="$(sed -nE 's/.*"nvidia-cublas~=([0-9]+)\..*/\1/p' scripts/setup.sh | head -n 1)"
[[ -n "$docker_ort" && -n "$cuda_image" ]] || die "$DOCKERFILE: no ARG ORT_VERSION / ARG CUDA_IMAGE"
[[ -n "$setup_ort" && -n "$setup_cublas" ]] || die "scripts/setup.sh: no ORT_GPU_VERSION / nvidia-cublas pin"

live_metadata() { # prints "name==version" and the Requires-Dist lines from PyPI, or fails
    local report
    report="$(mktemp)"
    # shellcheck disable=SC2064
    trap "rm -f '$report'" RETURN
    PIP_DISABLE_PIP_VERSION_CHECK=1 timeout 60 "$PY" -m pip install --dry-run --no-deps \
        --ignore-installed -q --report "$report" "onnxruntime-gpu==$1" >/dev/null 2>&1 || return 1
    "$PY" - "$report" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["install"][0]["metadata"]
print(f"{m['name']}=={m['version']}")
for r in m.get("requires_dist", []):
    print(f"Requires-Dist: {r}")
PY
}

if [[ "${1:-}" == --refresh ]]; then
    body="$(live_metadata "$setup_ort")" || die "PyPI not reachable: cannot refresh $META"
    { sed -n '/^#/p' "$META"; printf '%s\n' "$body"; } >"$META.tmp" && mv "$META.tmp" "$META"
    say "wrote $META for onnxruntime-gpu $setup_ort"
    exit 0
fi

recorded="$(grep -v '^#' "$META")"
meta_ver="$(sed -nE 's/^onnxruntime-gpu==([0-9.]+)$/\1/p' <<<"$recorded")"
cuda_req="$(sed -nE 's/^Requires-Dist: nvidia-cuda-runtime~=([0-9]+)\..*/\1/p' <<<"$recorded")"
cudnn_cuda="$(sed -nE 's/^Requires-Dist: nvidia-cudnn-cu([0-9]+)~=.*/\1/p' <<<"$recorded")"
cudnn_major="$(sed -nE 's/^Requires-Dist: nvidia-cudnn-cu[0-9]+~=([0-9]+)\..*/\1/p' <<<"$recorded")"
image_cuda="$(sed -nE 's#^nvidia/cuda:([0-9]+)\.[0-9]+(\.[0-9]+)?-cudnn[0-9]*-runtime-.*#\1#p' <<<"$cuda_image")"

problems=()
[[ "$meta_ver" == "$docker_ort" ]] || problems+=("$META is for onnxruntime-gpu $meta_ver, the Dockerfile installs $docker_ort")
[[ "$meta_ver" == "$setup_ort" ]] || problems+=("$META is for onnxruntime-gpu $meta_ver, scripts/setup.sh installs $setup_ort")
[[ -n "$cuda_req" ]] || problems+=("$META names no nvidia-cuda-runtime~=N requirement")
[[ -n "$image_cuda" ]] || problems+=("CUDA_IMAGE $cuda_image is not an nvidia/cuda:<ver>-cudnn-runtime-* image")
if [[ -n "$cuda_req" && -n "$image_cuda" && "$cuda_req" != "$image_cuda" ]]; then
    problems+=("CUDA_IMAGE $cuda_image is CUDA $image_cuda, onnxruntime-gpu $meta_ver needs CUDA $cuda_req (nvidia-cuda-runtime~=$cuda_req.x)")
fi
if [[ -n "$cudnn_cuda" && "$cudnn_cuda" != "$cuda_req" ]]; then
    problems+=("$META: cuDNN wheel for CUDA $cudnn_cuda but the runtime is CUDA $cuda_req")
fi
[[ "$setup_cublas" == "$cuda_req" ]] || problems+=("scripts/setup.sh pins nvidia-cublas~=$setup_cublas, the wheel needs CUDA $cuda_req")
((${#problems[@]} == 0)) || {
    for p in "${problems[@]}"; do say "ERROR: $p"; done
    die "the CUDA image, the set-up and the onnxruntime-gpu wheel disagree"
}
say "CUDA image $cuda_image matches onnxruntime-gpu $meta_ver (CUDA $cuda_req, cuDNN ${cudnn_major:-?})"

if live="$(live_metadata "$meta_ver")"; then
    if [[ "$live" != "$recorded" ]]; then
        diff <(printf '%s\n' "$recorded") <(printf '%s\n' "$live") >&2 || true
        die "$META differs from the wheel's metadata on PyPI (bash scripts/lint-gpu.sh --refresh)"
    fi
    say "$META equals the wheel's metadata on PyPI"
else
    say "PyPI not reachable: checked against the recorded metadata only"
fi

PROMTOOL="$ROOT/.local/lint/promtool"
if [[ -x "$PROMTOOL" ]]; then
    (cd deploy/prometheus/rules && "$PROMTOOL" check rules lipsync-infer-provider.yml >/dev/null &&
        "$PROMTOOL" test rules lipsync-infer-provider_test.yml >/dev/null) ||
        die "promtool: deploy/prometheus/rules/lipsync-infer-provider*.yml"
    say "promtool: infer provider rules ok"
else
    say "promtool not installed yet (scripts/lint-deploy.sh installs it): rules not checked"
fi
