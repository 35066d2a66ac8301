#!/usr/bin/env bash
# Refresh gateway/assets/redoc/ from the npm package `redoc` (default version 2.5.4).
set -euo pipefail
VERSION="${1:-2.5.4}"
DEST="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/redoc"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "redoc@${VERSION}" >/dev/null && tar xzf redoc-*.tgz)
cp "$TMP/package/bundles/redoc.standalone.js" "$TMP/package/bundles/redoc.standalone.js.LICENSE.txt" "$DEST/"
cp "$TMP/package/LICENSE" "$DEST/LICENSE"
sed -i "s/\`redoc\` [0-9][0-9.]*/\`redoc\` ${VERSION}/" "$DEST/README.md"
echo "redoc ${VERSION} -> $DEST"
