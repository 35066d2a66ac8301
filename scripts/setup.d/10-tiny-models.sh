#!/usr/bin/env bash
# Generate the `tiny` model profile (random weights, the real I/O contract) used by tests
# and smoke runs. Deterministic; skipped while the generator and its output are unchanged.
set -euo pipefail
out=models/generated/tiny
stamp="$out/.stamp"
want="$(sha256sum models/gen_tiny.py models/gen_mask.py models/manifest.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$out/manifest.lock.toml" ]]; then
    exit 0
fi
mkdir -p "$out"
"$LIPSYNC_PYTHON" models/gen_tiny.py --out "$out" >/dev/null
echo "$want" >"$stamp"
