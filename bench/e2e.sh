#!/usr/bin/env bash
# Whole-service benchmark (issue 6), release binaries, `tiny` model profile, real
# nats-server, media served over loopback HTTP:
#   1. a 10 s 720p face clip + 10 s audio: submit-to-completed wall time, each stage's
#      busy time (from the task record's per-stage timestamps) and its share of the
#      total, side by side with a bare ffmpeg decode + H.264 re-encode of the same clip
#      (crf 18, preset medium, AAC: the mux stage's own encode settings) measured in the
#      same run; goal: service <= 1.5x the bare re-encode;
#   2. peak RSS of every binary during a 5-minute 1080p task (goal <= 1 GB each): the
#      binary's own VmHWM, and the sampled peak of the binary plus its ffmpeg children.
#      That task runs with inference_steps = 4: memory does not depend on the step count,
#      and 20 tiny-model steps over 7,500 frames would take most of an hour on 2 cores.
# Knobs: E2E_BENCH_SECS (default 10), E2E_BENCH_LONG_S (default 300; 0 skips part 2),
# E2E_BENCH_STEPS (part 1, default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
secs=${E2E_BENCH_SECS:-10}
long_s=${E2E_BENCH_LONG_S:-300}
steps=${E2E_BENCH_STEPS:-20}
bash scripts/setup.d/20-face-assets.sh >/dev/null
cargo build --release -q --workspace --bins
bin_dir="${CARGO_TARGET_DIR:-target}/release"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
portrait=tests/assets/generated/astronaut.png
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# clip NAME W H SECONDS: the portrait scaled to the frame height, panning slowly, + audio.
clip() {
    local name=$1 w=$2 h=$3 s=$4
    ffmpeg -nostdin -v error -y -f lavfi -i "color=c=0x808080:s=${w}x${h}:r=25:d=$s" \
        -loop 1 -framerate 25 -i "$portrait" \
        -filter_complex "[1]scale=$h:$h[s];[0][s]overlay=x='($w-$h)/2+40*sin(n/40)':y=0:shortest=1" \
        -c:v libx264 -preset veryfast -crf 18 -pix_fmt yuv420p -t "$s" "$work/media/$name.mp4"
    ffmpeg -nostdin -v error -y -f lavfi -i "sine=frequency=220:beep_factor=4:duration=$s:sample_rate=44100" \
        -ac 1 "$work/media/$name.wav"
}
mkdir -p "$work/media" "$work/nats"
clip c720 1280 720 "$secs"

# --- the service --------------------------------------------------------------------
nats_port=$(free_port)
gw_port=$(free_port)
http_port=$(free_port)
"$LIPSYNC_NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
(cd "$work/media" && exec python3 -m http.server "$http_port" --bind 127.0.0.1) >/dev/null 2>&1 &
pids+=($!)
export LIPSYNC_NATS__URL="nats://127.0.0.1:$nats_port" LIPSYNC_MODELS__PROFILE=tiny \
    LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=true LIPSYNC_LOG__FILTER=warn \
    LIPSYNC_GATEWAY__LISTEN="127.0.0.1:$gw_port"
declare -A pid_of
for s in fetch face audio infer mux; do
    up=${s^^}
    env "LIPSYNC_${up}__LISTEN=127.0.0.1:$(free_port)" "$bin_dir/lipsync-$s" >"$work/$s.log" 2>&1 &
    pid_of[$s]=$!
    pids+=($!)
done
"$bin_dir/lipsync-gateway" >"$work/gateway.log" 2>&1 &
pid_of[gateway]=$!
pids+=($!)
api="http://127.0.0.1:$gw_port"
for _ in $(seq 200); do
    curl -fsS "$api/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "$api/readyz" >/dev/null || { cat "$work/gateway.log"; exit 1; }

# run NAME STEPS: submits NAME.mp4 + NAME.wav, waits for completion, prints the record.
run() {
    local name=$1 n=$2 id rec status
    id=$(curl -fsS -X POST "$api/sync" -H 'content-type: application/json' -d "{
        \"video_url\": \"http://127.0.0.1:$http_port/$name.mp4\",
        \"audio_url\": \"http://127.0.0.1:$http_port/$name.wav\",
        \"inference_steps\": $n, \"seed\": 1}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["task_id"])')
    while :; do
        rec=$(curl -fsS "$api/task/$id")
        status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$rec")
        case $status in
        completed) break ;;
        failed | cancelled) echo "task $id $status: $rec" >&2; exit 1 ;;
        esac
        sleep 0.05
    done
    echo "$rec"
}

# Warm-up (sessions are created at start-up; this also pages in the binaries).
clip warm 640 360 1
run warm 2 >/dev/null

t0=$(date +%s.%N)
rec=$(run c720 "$steps")
t1=$(date +%s.%N)
svc=$(python3 -c "print(f'{$t1 - $t0:.2f}')")

b0=$(date +%s.%N)
ffmpeg -nostdin -v error -y -i "$work/media/c720.mp4" -i "$work/media/c720.wav" -map 0:v -map 1:a \
    -c:v libx264 -crf 18 -preset medium -pix_fmt yuv420p -c:a aac -shortest "$work/bare.mp4"
b1=$(date +%s.%N)
bare=$(python3 -c "print(f'{$b1 - $b0:.2f}')")

echo "e2e bench ($(nproc) cores; release binaries, tiny profile, ${secs} s 1280x720 clip, $steps steps)"
python3 - "$rec" "$svc" "$bare" <<'PY'
import json, sys
rec, svc, bare = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
t0 = rec["start_time"]
print(f"  submit -> completed      {svc:7.2f} s   (record: created -> finished {rec['end_time'] - t0:.2f} s)")
print(f"  bare ffmpeg re-encode    {bare:7.2f} s   ratio {svc / bare:.2f}x (goal <= 1.5x)")
t = rec["stages"].get("infer", {})
if t.get("started_at") and t.get("finished_at"):
    rest = svc - (t["finished_at"] - t["started_at"])
    print(f"  without the infer stage  {rest:7.2f} s   ratio {rest / bare:.2f}x (infer: tiny models on these CPU cores,")
    print("                                     the GPU's part with real weights)")
print("  stage   start(s)  busy(s)  share of total")
for s in ["fetch", "face", "audio", "infer", "mux"]:
    t = rec["stages"].get(s, {})
    a, b = t.get("started_at"), t.get("finished_at")
    if a is None or b is None:
        print(f"  {s:<7} (no timing)")
        continue
    print(f"  {s:<7} {a - t0:8.2f} {b - a:8.2f}  {100 * (b - a) / svc:5.1f} %")
print("  (face and audio run side by side; infer waits for both; mux for infer)")
PY

# --- peak RSS on a long 1080p task ---------------------------------------------------
if ((long_s > 0)); then
    clip long 1920 1080 "$long_s"
    # Sample each binary's process tree (the binary and its ffmpeg children) every 0.5 s.
    tree_args=()
    for s in gateway fetch face audio infer mux; do tree_args+=("$s=${pid_of[$s]}"); done
    python3 - "$work/tree-peaks" "${tree_args[@]}" <<'PY' &
import os, sys, time
out, procs = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
def children():
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            kids.setdefault(ppid, []).append(p)
    return kids
def rss(p):
    try:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
peak = {n: 0 for n in procs}
while True:
    kids = children()
    for name, pid in procs.items():
        todo, total = [pid], 0
        while todo:
            p = todo.pop()
            total += rss(p)
            todo += kids.get(p, [])
        peak[name] = max(peak[name], total)
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(f"{n} {k}" for n, k in peak.items()) + "\n")
    os.replace(out + ".tmp", out)
    time.sleep(0.5)
PY
    pids+=($!)
    l0=$(date +%s)
    run long 4 >/dev/null
    l1=$(date +%s)
    sleep 1
    echo "  peak RSS during a ${long_s} s 1920x1080 task ($((l1 - l0)) s, 4 steps; goal <= 1024 MB each):"
    echo "    binary            own VmHWM   with ffmpeg children (sampled)"
    for s in gateway fetch face audio infer mux; do
        kb=$(awk '/VmHWM/ {print $2}' "/proc/${pid_of[$s]}/status")
        tk=$(awk -v n="$s" '$1 == n {print $2}' "$work/tree-peaks")
        printf '    lipsync-%-8s %6d MB   %6d MB\n' "$s" $((kb / 1024)) $((tk / 1024))
    done
fi
