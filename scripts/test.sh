#!/usr/bin/env bash
# Set up, then run the tests: tiny random models everywhere, plus the tests marked real_model on
# smollm2-135m; tests marked gpu are skipped without CUDA. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
