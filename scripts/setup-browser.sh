#!/usr/bin/env bash
# Installs Debian's Chromium for the web-gallery browser tests (Playwright drives it;
# Playwright's own browser download cannot work offline).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium is missing; install Debian's chromium package to run the browser tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
    echo "could not install chromium: the browser test of the gallery will be skipped" >&2
fi
