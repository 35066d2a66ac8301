#!/usr/bin/env bash
# Scale-out benchmark (issue 11): tasks per minute with 1 and with 2 infer replicas on
# the same queue of 8 tasks, release binaries, `tiny` profile, one intra-op thread per
# ONNX session, a fresh nats-server per run, media over loopback HTTP. Printed side by
# side with the speed-up, and the infer-only share of each run: the summed inference
# time of the 8 tasks over (wall time x infer replicas), i.e. how busy the infer
# replicas were. On a 2-core machine every stage competes for the same two cores, so
# the speed-up is bounded well below 2x; on a cluster each replica brings its own GPU.
# Knobs: SCALE_BENCH_TASKS (default 8), SCALE_BENCH_SECS (clip seconds, default 2),
# SCALE_BENCH_STEPS (default 20), SCALE_BENCH_PROFILE (release, or debug to reuse the
# test build's binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
tasks=${SCALE_BENCH_TASKS:-8}
secs=${SCALE_BENCH_SECS:-2}
steps=${SCALE_BENCH_STEPS:-20}
bash scripts/setup.d/20-face-assets.sh >/dev/null
if [[ ${SCALE_BENCH_PROFILE:-release} == debug ]]; then
    cargo build -q --workspace --bins
    bin_dir="${CARGO_TARGET_DIR:-target}/debug"
else
    cargo build --release -q --workspace --bins
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
work="$(mktemp -d)"
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
trap 'stop_all; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$work/media"
portrait=tests/assets/generated/astronaut.png
ffmpeg -nostdin -v error -y -loop 1 -framerate 25 -i "$portrait" -t "$secs" \
    -vf "scale=528:528,crop=512:512:'8+sin(t)*4':8,setsar=1" -r 25 \
    -c:v libx264 -preset ultrafast -pix_fmt yuv420p "$work/media/face.mp4"
ffmpeg -nostdin -v error -y -f lavfi -i "sine=frequency=220:beep_factor=4:duration=$secs:sample_rate=44100" \
    -ac 1 "$work/media/voice.wav"
http_port=$(free_port)
(cd "$work/media" && exec python3 -m http.server "$http_port" --bind 127.0.0.1) >/dev/null 2>&1 &
media_pid=$!

# run REPLICAS: a fresh service with REPLICAS infer processes; prints
# "<wall s> <summed infer s>" after all tasks completed.
run() {
    local replicas=$1 nats_port gw_port api ids=() id
    nats_port=$(free_port)
    gw_port=$(free_port)
    rm -rf "$work/nats" && mkdir -p "$work/nats"
    "$LIPSYNC_NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
    pids+=($!)
    export LIPSYNC_NATS__URL="nats://127.0.0.1:$nats_port" LIPSYNC_MODELS__PROFILE=tiny \
        LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=true LIPSYNC_LOG__FILTER=warn \
        LIPSYNC_GATEWAY__LISTEN="127.0.0.1:$gw_port" LIPSYNC_FACE__INTRA_THREADS=1 \
        LIPSYNC_AUDIO__INTRA_THREADS=1 LIPSYNC_INFER__INTRA_THREADS=1
    for s in fetch face audio mux; do
        env "LIPSYNC_${s^^}__LISTEN=127.0.0.1:$(free_port)" "$bin_dir/lipsync-$s" >"$work/$s.log" 2>&1 &
        pids+=($!)
    done
    for _ in $(seq "$replicas"); do
        env "LIPSYNC_INFER__LISTEN=127.0.0.1:$(free_port)" "$bin_dir/lipsync-infer" >>"$work/infer.log" 2>&1 &
        pids+=($!)
    done
    "$bin_dir/lipsync-gateway" >"$work/gateway.log" 2>&1 &
    pids+=($!)
    api="http://127.0.0.1:$gw_port"
    for _ in $(seq 300); do
        curl -fsS "$api/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS "$api/readyz" >/dev/null || { cat "$work/gateway.log" >&2; exit 1; }
    sleep 1 # every stage's consumer is pulling
    local t0 t1
    t0=$(date +%s.%N)
    for _ in $(seq "$tasks"); do
        id=$(curl -fsS -X POST "$api/sync" -H 'content-type: application/json' -d "{
            \"video_url\": \"http://127.0.0.1:$http_port/face.mp4\",
            \"audio_url\": \"http://127.0.0.1:$http_port/voice.wav\",
            \"inference_steps\": $steps, \"seed\": 1}" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
        ids+=("$id")
    done
    python3 - "$api" "${ids[@]}" <<'PY'
import json, sys, time, urllib.request
api, ids = sys.argv[1], sys.argv[2:]
while True:
    recs = [json.load(urllib.request.urlopen(f"{api}/task/{i}")) for i in ids]
    bad = [r for r in recs if r["status"] == "failed"]
    if bad:
        sys.exit(f"task failed: {bad[0]}")
    if all(r["status"] == "completed" for r in recs):
        break
    time.sleep(0.05)
PY
    t1=$(date +%s.%N)
    python3 - "$api" "$t0" "$t1" "${ids[@]}" <<'PY'
import json, sys, urllib.request
api, t0, t1, ids = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
infer = 0.0
for i in ids:
    s = json.load(urllib.request.urlopen(f"{api}/task/{i}"))["stages"]["infer"]
    infer += s["finished_at"] - s["started_at"]
print(f"{t1 - t0:.2f} {infer:.2f}")
PY
    stop_all
}

one=$(run 1)
two=$(run 2)
kill "$media_pid" 2>/dev/null || true
echo "scale bench ($(nproc) cores; ${SCALE_BENCH_PROFILE:-release} binaries, tiny profile, $tasks tasks of ${secs} s 512x512, $steps steps)"
python3 - "$tasks" "$one" "$two" <<'PY'
import sys
n = int(sys.argv[1])
w1, i1 = map(float, sys.argv[2].split())
w2, i2 = map(float, sys.argv[3].split())
tpm1, tpm2 = 60 * n / w1, 60 * n / w2
print("  infer replicas   wall (s)   tasks/min   infer busy share")
print(f"  1                {w1:8.2f}   {tpm1:9.2f}   {100 * i1 / w1:6.1f} %")
print(f"  2                {w2:8.2f}   {tpm2:9.2f}   {100 * i2 / (2 * w2):6.1f} %")
print(f"  speed-up with the second replica: {tpm2 / tpm1:.2f}x")
PY
