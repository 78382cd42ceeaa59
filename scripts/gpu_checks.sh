#!/usr/bin/env bash
# The GPU measurements the open issues still need, prepared for a session that has a device
# (an H100 through the `device` tool). One stage per call, each well inside 10 minutes:
#
#   bash scripts/gpu_checks.sh kernels    # GPU-marked tests: every fast kernel against its reference
#   bash scripts/gpu_checks.sh bench      # bf16 engine vs HF generate, bnb and torchao peers (issue 3)
#   bash scripts/gpu_checks.sh sweep      # int8 / int4 / W8A8 / FP8 / 2:4 / structured vs bf16, with
#                                         # speed-up verdicts (issues 5, 6, 7)
#   bash scripts/gpu_checks.sh gptq       # GPTQ of the 8B shape, layers offloaded to the CPU (issue 4)
#   bash scripts/gpu_checks.sh triton     # the Triton GEMV / GEMM: GPU tests, int4 / int8 with them
#   bash scripts/gpu_checks.sh inductor   # int4 / int8 through inductor's fused dequantize-GEMV with
#                                         # coordinate-descent-tuned kernels (--tune-kernels)
#   bash scripts/gpu_checks.sh fused      # bf16 / int4 / int8 with q/k/v and gate/up fused
#                                         # (--bench-fuse-projections), against `short`'s figures
#   bash scripts/gpu_checks.sh engine     # bf16 decode at batch 1 and 8: as is, with the GQA decode
#                                         # attention (--gqa-decode), and with fused projections too
#   bash scripts/gpu_checks.sh prefill    # bf16 prefill compiled (--compile-prefill), then also
#                                         # with fused projections: the 70%-of-matmul goal
#   bash scripts/gpu_checks.sh smollm2    # speed of the SmolLM2 sweep's recipes (issue 7), joined
#                                         # with its CPU quality by `compress report --speed-from`
#   bash scripts/gpu_checks.sh short      # what one 15-minute lease holds: the kernel tests, the
#                                         # per-shape kernel timings, bf16 / int4 / int8 / FP8 /
#                                         # W8A8 / 2:4 / structured at batch 1, bf16 against HF
#                                         # eager; each step under a time limit (T_KERNELS,
#                                         # T_KERNEL_BENCH, T_SWEEP, T_BENCH; 0 skips a step);
#                                         # everything packed in $OUT/gpu-short.tgz
#
# A 15-minute lease, spent as reports/h200-llama3-8b suggests (machine start and idle count too):
#   1. bash scripts/gpu_checks.sh short (default limits T_KERNELS=150 T_KERNEL_BENCH=120
#      T_SWEEP=310 T_BENCH=0; device timeout_s 595): the GPU tests but Triton's, kernel timings
#      (int4 fused GEMV at 0.5 byte per weight now, coordinate-descent-tuned columns), then
#      int4, W8A8, 2:4, mlp25, layers-drop4, FP8, int8 at batch 1 against bf16, profiled.
#   2. `engine` (bf16 decode: GQA attention, fused projections), `inductor` (int4 / int8 decode,
#      tuned inductor GEMVs), `triton`, `fused`, `prefill`, `smollm2`, `gptq`, `bench` (carry
#      .whl for its bitsandbytes and torchao peers).
#
# Figures land in $OUT (default: $OUT of the device tool, else reports/gpu-<shape>); copy them
# into reports/ with the GPU name. The device image has torch, transformers, pandas, pyyaml,
# matplotlib and pytest; the bnb-* and torchao-* peers need bitsandbytes / torchao carried as
# wheels, else they are skipped with a reason: wheels in .whl/ (ignored by git; name it in the
# device tool's `carry`) are installed first, e.g. bitsandbytes 0.50.2 and torchao 0.17.0 (its
# first release for torch 2.11), fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl NAME==VERSION
# Dry run of every command on a CPU at toy sizes:
#   MODEL=random:smollm2-135m DEVICE=cpu OUT=/tmp/gpu-dry SMALL=1 bash scripts/gpu_checks.sh all
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
MODEL=${MODEL:-random:llama3-8b}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-reports/gpu-${MODEL#random:}}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
compress() { PYTHONUNBUFFERED=1 "$PY" -m compress.cli "$@"; }
if compgen -G ".whl/*.whl" > /dev/null && [ "$DEVICE" = cuda ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-site .whl/*.whl && export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
if [ -n "${SMALL:-}" ]; then   # the dry run: toy shapes, one repeat, no peers that need CUDA
    SHAPES=(--batch 1,2 --prompt 16 --new 4 --prefill 1x32 --warmup 0 --repeats 1)
    SWEEP_SHAPES=(--bench-batch 1 --bench-prompt 16 --bench-new 4 --bench-prefill 1x32
                  --bench-warmup 0 --bench-repeats 1 --windows 1 --seq-len 64)
    PEERS=hf; CALIB=(--calib-samples 4 --calib-seq-len 64); COMPILE=(); GROUP=64
    SHAPES_B1=(--prompt 16 --new 4 --prefill 1x32 --warmup 0 --repeats 1)
    SWEEP_B1=(--bench-prompt 16 --bench-new 4 --bench-prefill 1x32 --bench-warmup 0
              --bench-repeats 1)
else                           # PROTOCOL.md 'Speed'
    SHAPES=(); SWEEP_SHAPES=(--windows 4); PEERS=hf,hf-eager,bnb-int8,bnb-nf4,torchao-int4,torchao-int8
    CALIB=(--calib-samples 128 --calib-seq-len 2048); COMPILE=(--compile); GROUP=128
    SHAPES_B1=(--prompt 512 --new 128 --prefill 1x2048 --warmup 2 --repeats 5)
    SWEEP_B1=(--bench-prompt 512 --bench-new 128 --bench-prefill 1x2048 --bench-warmup 2
              --bench-repeats 5)
fi
run_stage() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }

if run_stage kernels; then
    "$PY" -m pytest -v --durations=10 -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/kernels.log"
fi
if run_stage bench; then
    # Twice: the speed protocol asks two runs of one command to agree within 5%.
    for run in 1 2; do
        compress bench "$MODEL" --device "$DEVICE" --peers "$PEERS" "${COMPILE[@]}" \
            "${SHAPES[@]}" --out "$OUT/bench-bf16-run$run" --overwrite
    done
fi
if run_stage sweep; then
    compress sweep recipes/int8-channel.yaml recipes/int4-g64-sym.yaml \
        recipes/smoothquant-w8a8.yaml recipes/fp8-w8a8.yaml recipes/sparsegpt-2of4.yaml \
        recipes/mlp25.yaml recipes/layers-drop4.yaml --model "$MODEL" --device "$DEVICE" \
        --corpus random --bench --bench-semi-structured "${COMPILE[@]}" "${SWEEP_SHAPES[@]}" \
        --out "$OUT/sweep" \
        --overwrite --title "$MODEL on $DEVICE: speed of each recipe against bf16 (random weights)"
fi
if [ "$STAGE" = short ]; then
    # Each step has its own limit so that the whole stays inside one 10-minute call and what was
    # measured comes back even when a step runs out of time: a sweep stopped by `timeout` leaves
    # its finished JSONs in its hidden .sweep-b1.tmp-* folder; one failed recipe does not stop it.
    WORK=$(mktemp -d /tmp/gpu-short.XXXX)
    { nvidia-smi || true; "$PY" -c "import torch, transformers; print(torch.__version__, \
      transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    } > "$WORK/machine.txt" 2>&1
    # The Triton kernels' tests (each tunes its GEMV) are the `triton` stage's.
    timeout "${T_KERNELS:-150}" "$PY" -m pytest -v --durations=10 -p no:cacheprovider -m gpu \
        --ignore=tests/test_triton_kernels.py tests/ \
        > "$WORK/kernels.log" 2>&1 || echo "kernels: exit $?" >> "$WORK/kernels.log"
    [ -n "${SMALL:-}" ] && INT4=recipes/int4-g64-sym.yaml || INT4=recipes/int4-g128-sym.yaml
    if [ "${T_KERNEL_BENCH:-120}" -gt 0 ]; then
        # One decode row (every candidate compiled: the slow part) and one prefill size.
        timeout "${T_KERNEL_BENCH:-120}" "$PY" -m compress.evaluate.kernel_bench \
            --shape "${MODEL#random:}" --rows 1,2048 --group-size "$GROUP" --device "$DEVICE" \
            --out "$WORK/kernel-bench/kernels.json" \
            > "$WORK/kernel-bench.log" 2>&1 || echo "kernel bench: exit $?" >> "$WORK/kernel-bench.log"
    fi
    # Ordered by what is most worth knowing (a step stopped by its time limit loses the last
    # recipes first): int4 after the fix of its dequantization, then what no GPU has measured
    # (W8A8, 2:4, structured), FP8 with its fused epilogue, int8 (reports/h200-llama3-8b).
    timeout "${T_SWEEP:-310}" "$PY" -m compress.cli sweep "$INT4" recipes/smoothquant-w8a8.yaml \
        recipes/wanda-2of4.yaml recipes/mlp25.yaml recipes/layers-drop4.yaml \
        recipes/fp8-w8a8.yaml recipes/int8-channel.yaml "${INT4%.yaml}-lmhead8.yaml" \
        --model "$MODEL" --device "$DEVICE" \
        --corpus random --windows 1 --seq-len 512 --bench --bench-semi-structured \
        --bench-profile "${COMPILE[@]}" --bench-batch 1 "${SWEEP_B1[@]}" --out "$WORK/sweep-b1" \
        --overwrite \
        --title "$MODEL on $DEVICE, batch 1: each recipe against bf16 (random weights)" \
        > "$WORK/sweep-b1.log" 2>&1 || echo "sweep: exit $?" >> "$WORK/sweep-b1.log"
    if [ "${T_BENCH:-0}" -gt 0 ]; then
        timeout "${T_BENCH:-0}" "$PY" -m compress.cli bench "$MODEL" --device "$DEVICE" \
            --peers hf-eager "${COMPILE[@]}" --batch 1 "${SHAPES_B1[@]}" --out "$WORK/bench-bf16" \
            --overwrite > "$WORK/bench-bf16.log" 2>&1 || echo "bench: exit $?" >> "$WORK/bench-bf16.log"
    fi
    tar czf "$OUT/gpu-short.tgz" -C "$WORK" .
    cp "$WORK"/*.log "$WORK/machine.txt" "$OUT"/ 2>/dev/null || true
fi
if run_stage triton; then
    # The Triton GEMV and GEMM (compress/formats/triton_kernels.py): their GPU tests, then int4 /
    # int8 at batch 1 and prefill 1x2048 with them, against bf16 (compare with `short`'s figures).
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py 2>&1 \
        | tee "$OUT/triton-tests.log" || true
    [ -n "${SMALL:-}" ] && INT4=recipes/int4-g64-sym.yaml || INT4=recipes/int4-g128-sym.yaml
    compress sweep "$INT4" recipes/int8-channel.yaml --model "$MODEL" --device "$DEVICE" \
        --corpus random --windows 1 --seq-len 512 --bench "${COMPILE[@]}" --bench-batch 1 \
        "${SWEEP_B1[@]}" --bench-kernel int4=triton,int8=triton --out "$OUT/sweep-triton" \
        --overwrite --title "$MODEL on $DEVICE, batch 1: int4 / int8 with the Triton kernels" || true
fi
if run_stage inductor; then
    # Decode through inductor's fused dequantize-GEMV for int4 as well as int8 (int4 read five
    # times its bytes there before unpack_int4 was fixed), every compiled kernel tuned, bf16 too.
    [ -n "${SMALL:-}" ] && INT4=recipes/int4-g64-sym.yaml || INT4=recipes/int4-g128-sym.yaml
    compress sweep "$INT4" recipes/int8-channel.yaml --model "$MODEL" --device "$DEVICE" \
        --corpus random --windows 1 --seq-len 512 --bench "${COMPILE[@]}" --bench-batch 1 \
        "${SWEEP_B1[@]}" $([ ${#COMPILE[@]} -gt 0 ] && echo --bench-tune-kernels) \
        --bench-kernel int4=fused-gemv --out "$OUT/sweep-inductor" --overwrite \
        --title "$MODEL on $DEVICE, batch 1: int4 / int8 through tuned inductor GEMVs" || true
fi
if run_stage fused; then
    # Four matmuls per decode layer instead of seven (evaluate/fuse.py); the baseline is fused too.
    [ -n "${SMALL:-}" ] && INT4=recipes/int4-g64-sym.yaml || INT4=recipes/int4-g128-sym.yaml
    compress sweep "$INT4" recipes/int8-channel.yaml --model "$MODEL" --device "$DEVICE" \
        --corpus random --windows 1 --seq-len 512 --bench "${COMPILE[@]}" --bench-batch 1 \
        "${SWEEP_B1[@]}" --bench-fuse-projections --out "$OUT/sweep-fused" --overwrite \
        --title "$MODEL on $DEVICE, batch 1: q/k/v and gate/up fused" || true
fi
if run_stage engine; then
    # The 85%-of-roofline goal: transformers' decode copies the K/V cache for GQA every step
    # (repeat_kv; worse at batch 8) and runs 7 matmuls a layer where 4 would do.
    for opts in "" "--gqa-decode" "--gqa-decode --fuse-projections"; do
        name=${opts:-default}; name=${name//--/}; name=${name// /+}
        # shellcheck disable=SC2086  # $opts is a list of flags
        compress bench "$MODEL" --device "$DEVICE" --peers none "${COMPILE[@]}" --batch 1,8 \
            "${SHAPES_B1[@]}" $opts --out "$OUT/bench-engine-$name" --overwrite || true
    done
fi
if run_stage prefill; then
    # Eager prefill reached 62-66% of the matmul rate on an H200; the element-wise work between
    # the matmuls (norms, rotary, activation) is what compiling fuses.
    compress bench "$MODEL" --device "$DEVICE" --peers none "${COMPILE[@]}" --batch 1 \
        "${SHAPES_B1[@]}" --compile-prefill --profile --out "$OUT/bench-prefill-compiled" \
        --overwrite || true
    compress bench "$MODEL" --device "$DEVICE" --peers none "${COMPILE[@]}" --batch 1 \
        "${SHAPES_B1[@]}" --compile-prefill --fuse-projections --profile \
        --out "$OUT/bench-prefill-fused" \
        --overwrite || true
fi
if run_stage smollm2; then
    # Issue 7: the speed of reports/smollm2-135m-sweep's seven recipes, timed on random weights of
    # SmolLM2's shape (its GGUF file cannot travel). Join them here with
    #   compress report reports/smollm2-135m-sweep --speed-from <this sweep> --out DIR
    compress sweep recipes/int8-channel.yaml recipes/int4-g64-sym.yaml \
        recipes/gptq-w4-g64-sym-actorder.yaml recipes/awq-w4-g64-sym.yaml \
        recipes/smoothquant-w8a8.yaml recipes/wanda-50.yaml recipes/sparsegpt-2of4-gptq-int4.yaml \
        --model random:smollm2-135m --device "$DEVICE" --corpus random --windows 1 --seq-len 512 \
        --bench --bench-semi-structured "${COMPILE[@]}" "${SWEEP_SHAPES[@]}" \
        --out "$OUT/smollm2-speed" --overwrite \
        --title "random:smollm2-135m on $DEVICE: speed of the SmolLM2 sweep's recipes" || true
fi
if run_stage gptq; then
    # The model waits on the CPU; each layer is calibrated on the GPU (peak GPU memory printed).
    compress quantize "$MODEL" --method gptq --bits 4 --group-size "$GROUP" --symmetric \
        --device cpu --dtype bfloat16 --calib-device "$DEVICE" --corpus random "${CALIB[@]}" \
        --out "$OUT/gptq-checkpoint" --overwrite 2>&1 | tee "$OUT/gptq.log"
    rm -rf "$OUT/gptq-checkpoint"   # 5 GB of random int4 weights: the log is the figure
fi
