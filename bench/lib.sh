# Helpers sourced by the bench scripts (`. bench/lib.sh` from the workspace root); not
# executable, so scripts/bench.sh does not run it as a benchmark.

# face_track W H FRAMES: prints the face track JSON of a W x H clip of FRAMES frames: one
# still face, centred, half the frame high, in the latentsync-1.6 crop box.
face_track() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
w, h, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cw, ch = 420, 560                 # latentsync-1.6 crop box
s = 0.5 * h / ch                  # the face box is half the frame high
tx, ty = (w - cw * s) / 2, (h - ch * s) / 2
a = [[1 / s, 0.0, -tx / s], [0.0, 1 / s, -ty / s]]
f = {"present": True, "score": 0.9, "bbox": [tx, ty, tx + cw * s, ty + ch * s],
     "landmarks": [], "affine": a, "interpolated": False}
print(json.dumps({"v": 1, "fps": 25.0, "width": w, "height": h, "frame_count": n,
                  "crop_w": cw, "crop_h": ch, "resolution": 512, "detector": "bench",
                  "frames": [f] * n}))
PY
}

# mux_bench_setup: builds the release lipsync-mux and sets `bin` (its path) and `work` (a
# scratch folder removed when the calling script exits).
mux_bench_setup() {
    cargo build --release -q -p lipsync-mux
    bin=target/release/lipsync-mux
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
}
