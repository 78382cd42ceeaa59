"""A/B behind CPU_KERNEL_MAX_ROWS[torch.float32] = 1 (compress/formats/base.py): float32 decode
at batch 1 of random:smollm2-135m on the CPU, quantized layers through dequantize + matmul
("reference") against torch's CPU kernels ("kernel"), interleaved rounds in one process.

    python reports/smollm2-135m-cpu-bf16-speed/fp32-decode-ab/ab_fp32.py OUT.json
"""
import copy
import json
import platform
import statistics
import sys
import time

import torch

from compress.evaluate.engine import Engine, random_tokens
from compress.formats.base import CPU_KERNEL_MAX_ROWS
from compress.quant.rtn import RTNConfig, rtn
from compress.sources import load_random

PROMPT, STEPS, REPEATS, ROUNDS = 128, 32, 5, 3


def decode_ms(model) -> float:
    """Median ms per decode step (STEPS - 1 forward steps after the prefill), of REPEATS runs."""
    engine = Engine(model)  # builds the kernel layouts the current rule allows
    engine.allocate(1, PROMPT + STEPS + 1)
    ids = random_tokens(1, PROMPT, model.config.vocab_size, "cpu")
    engine.generate(ids, 4, stop_on_eos=False)
    times = []
    for _ in range(REPEATS):
        logits = engine.prefill(ids)
        positions = engine.next_positions(PROMPT)
        started = time.perf_counter()
        engine.decode(logits, positions, STEPS, stop_on_eos=False)
        times.append((time.perf_counter() - started) / (STEPS - 1) * 1e3)
    return statistics.median(times)


def main(out: str) -> None:
    base = load_random("smollm2-135m").model.eval()
    models = {"float32": base}
    for bits, group in ((8, 0), (4, 64)):
        models[f"int{bits}"] = rtn(copy.deepcopy(base), RTNConfig(bits=bits, group_size=group,
                                                                  symmetric=True))
    rows = []
    for round_ in range(ROUNDS):
        for name, model in models.items():
            for path in ("reference", "kernel") if name != "float32" else ("float32",):
                CPU_KERNEL_MAX_ROWS.pop(torch.float32, None)
                if path == "kernel":
                    CPU_KERNEL_MAX_ROWS[torch.float32] = 1
                ms = decode_ms(model)
                rows.append({"round": round_, "model": name, "path": path, "ms_per_token": ms})
                print(rows[-1], flush=True)
    doc = {"what": __doc__.split("\n\n")[0], "prompt": PROMPT, "steps": STEPS,
           "repeats": REPEATS, "rounds": ROUNDS, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.platform(), "rows": rows}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
