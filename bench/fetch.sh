#!/usr/bin/env bash
# Fetch throughput on loopback versus curl to /dev/null on the same file, and peak RSS
# while fetching a 1 GiB file (issue 2 goal: within 1.2x of curl, RSS under 100 MB).
# The file is served by one local static server for both clients, in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./.local/env.sh
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
cargo build --release -q -p lipsync-fetch
work="$(mktemp -d)"
trap 'kill $srv 2>/dev/null || true; rm -rf "$work"' EXIT
size_mb=${FETCH_BENCH_MB:-1024}
head -c "$((size_mb * 1024 * 1024))" /dev/urandom >"$work/file.bin"
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
(cd "$work" && exec python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) &
srv=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
url="http://127.0.0.1:$port/file.bin"

best_curl=999999; best_ours=999999; rss=0
for run in 1 2 3; do
    t=$(curl -s -o /dev/null -w '%{time_total}' "$url")
    best_curl=$(python3 -c "print(min($best_curl, $t))")
    out=$( { LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS=true LIPSYNC_LOG__FILTER=error \
        /usr/bin/time -v target/release/lipsync-fetch get "$url"; } 2>&1 )
    secs=$(grep -oE 'in [0-9.]+ s' <<<"$out" | awk '{print $2}')
    kb=$(grep 'Maximum resident set size' <<<"$out" | awk '{print $NF}')
    best_ours=$(python3 -c "print(min($best_ours, $secs))")
    rss=$(python3 -c "print(max($rss, $kb))")
done
python3 - "$size_mb" "$best_curl" "$best_ours" "$rss" <<'PY'
import sys
mb, c, o, rss = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"fetch bench: {mb:.0f} MiB over loopback (best of 3, same server)")
print(f"  {'client':<22}{'seconds':>9}{'MB/s':>9}")
print(f"  {'curl -o /dev/null':<22}{c:>9.2f}{mb*1.048576/c:>9.0f}")
print(f"  {'lipsync-fetch get':<22}{o:>9.2f}{mb*1.048576/o:>9.0f}")
print(f"  ratio lipsync/curl: {o/c:.2f}x (goal <= 1.2x)")
print(f"  peak RSS lipsync-fetch: {rss/1024:.1f} MB (goal < 100 MB)")
PY
