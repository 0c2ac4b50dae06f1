#!/usr/bin/env bash
# Refreshes the vendored OpenSeadragon (bot/static/openseadragon.min.js and its licence) from
# the npm registry. The gallery serves the committed copy, so setup and CI need no npm; run this
# only to move to another version, then update OSD_VERSION here and in bot/static/VENDORED.md.
set -euo pipefail
OSD_VERSION=${OSD_VERSION:-6.1.1}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "openseadragon@$OSD_VERSION" >/dev/null && tar xzf ./*.tgz)
cp "$work/package/build/openseadragon/openseadragon.min.js" bot/static/openseadragon.min.js
cp "$work/package/LICENSE.txt" bot/static/OPENSEADRAGON-LICENSE.txt
sha256sum bot/static/openseadragon.min.js
