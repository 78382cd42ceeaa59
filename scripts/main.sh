#!/usr/bin/env bash
# The main job on the embedded defaults: set up, then evaluate smollm2-135m (float), quantize it
# with the recipes below (int8 per channel, int4 group 64 symmetric and asymmetric), evaluate each
# and write the comparison to reports/smollm2-135m-rtn/ (report.md + one results JSON per run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/compress sweep recipes/int8-channel.yaml recipes/int4-g64-sym.yaml \
    recipes/int4-g64-asym.yaml --model smollm2-135m --out "${OUT:-reports/smollm2-135m-rtn}" \
    --overwrite "$@"
