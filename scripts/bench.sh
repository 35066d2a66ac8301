#!/usr/bin/env bash
# scripts/bench.sh: run every executable file in bench/ (sorted by name), each from
# the repository root with .local/env.sh sourced. Extra arguments go to every
# benchmark. Exits non-zero if any benchmark failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -f .local/env.sh ]]; then
    # shellcheck source=/dev/null
    . ./.local/env.sh
fi

shopt -s nullglob
benches=()
for f in bench/*; do
    [[ -f "$f" && -x "$f" ]] && benches+=("$f")
done
if ((${#benches[@]} == 0)); then
    echo "bench: no executable files in bench/, nothing to run"
    exit 0
fi

failed=()
for b in "${benches[@]}"; do
    echo "bench: === $b"
    start=$SECONDS
    if "./$b" "$@"; then
        echo "bench: --- $b ok ($((SECONDS - start)) s)"
    else
        rc=$?
        echo "bench: --- $b FAILED (exit $rc, $((SECONDS - start)) s)"
        failed+=("$b")
    fi
done
if ((${#failed[@]})); then
    echo "bench: failed: ${failed[*]}"
    exit 1
fi
echo "bench: all ${#benches[@]} benchmark(s) passed"
