"""The results JSON: one per model x recipe x protocol, with keys model, recipe, protocol, metrics,
environment. Written atomically."""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile

import torch

import compress
from compress.errors import user_error_on


def environment(device=None) -> dict:
    """Versions and machine; the GPU named is `device`'s (cuda:N), else the current one."""
    import transformers

    env = {"compress": compress.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "gpu": None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(_cuda_index(device))
        env["gpu"] = props.name
        env["gpu_memory_bytes"] = props.total_memory
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    return env


def _cuda_index(device) -> int:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


def _nvidia_driver() -> str | None:
    """One host, one driver: the first GPU's line."""
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return (out.stdout.strip().splitlines() or [None])[0]
    except (OSError, subprocess.SubprocessError):
        return None


def build_results(model_info: dict, recipe: dict | None, protocol: dict, metrics: dict,
                  device=None) -> dict:
    return {"model": model_info, "recipe": recipe, "protocol": protocol, "metrics": metrics,
            "environment": environment(device)}


def write_json(data: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    with user_error_on(f"cannot write {path}", OSError):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
        os.chmod(tmp, default_mode())  # mkstemp's file is private; results are not
        with user_error_on(f"cannot write {path}", OSError):
            os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def default_mode(directory: bool = False) -> int:
    """The mode the umask gives a new file (or folder): mkstemp / mkdtemp make private ones."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)
