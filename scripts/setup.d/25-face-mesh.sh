#!/usr/bin/env bash
# The face-mesh model for `face.anchors = "mesh"`, from a package registry (never
# committed): MediaPipe's 468-point face landmark model (Apache-2.0),
# mediapipe/modules/face_landmark/face_landmark.tflite in the PyPI wheel mediapipe
# 0.10.18 (checked against its pinned sha256), converted by our own converter
# stages/face/tools/face_mesh_onnx.py into models/generated/face/face_mesh_468.onnx.
# The converter's flatbuffer reader (PyPI tflite 2.18.0) goes into a scratch folder,
# not into .venv. Idempotent and quiet: a stamp keyed on this script and the converter
# skips the work while the output is present.
set -euo pipefail

PY="${LIPSYNC_PYTHON:-.venv/bin/python}"
MODELS=models/generated/face
OUT="$MODELS/face_mesh_468.onnx"
MEDIAPIPE_VERSION=0.10.18
TFLITE_PKG_VERSION=2.18.0
TFLITE_SHA=1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814
CONVERTER=stages/face/tools/face_mesh_onnx.py

stamp="$MODELS/.mesh-stamp"
want="$(cat "${BASH_SOURCE[0]}" "$CONVERTER" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -s "$OUT" ]]; then
    exit 0
fi

mkdir -p "$MODELS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"
fail() {
    echo "25-face-mesh: ERROR: $*" >&2
    [[ -f "$log" ]] && tail -n 20 "$log" >&2
    exit 1
}

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux_2_17_x86_64 -d "$work/pip" \
    "mediapipe==$MEDIAPIPE_VERSION" >"$log" 2>&1 || fail "pip download mediapipe"
(cd "$work" && unzip -q -o -j pip/mediapipe-"$MEDIAPIPE_VERSION"-*.whl \
    mediapipe/modules/face_landmark/face_landmark.tflite) >>"$log" 2>&1 || fail "unzip mediapipe"
got="$(sha256sum "$work/face_landmark.tflite" | cut -d' ' -f1)"
[[ "$got" == "$TFLITE_SHA" ]] || fail "face_landmark.tflite: sha256 $got, expected $TFLITE_SHA"
"$PY" -m pip install -q --no-deps --target "$work/py" "tflite==$TFLITE_PKG_VERSION" \
    >>"$log" 2>&1 || fail "pip install tflite"
PYTHONPATH="$work/py" "$PY" "$CONVERTER" "$work/face_landmark.tflite" "$work/mesh.onnx" \
    >>"$log" 2>&1 || fail "conversion"
mv -f "$work/mesh.onnx" "$OUT"
echo "$want" >"$stamp"
