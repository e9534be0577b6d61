#!/usr/bin/env bash
# Create .venv with the CPU build of torch and vldistill (editable) plus its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch 2.13.0 first: on this platform that pin takes the local CPU build instead of a multi-GB CUDA one.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
