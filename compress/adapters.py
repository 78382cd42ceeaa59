"""Architecture differences in one small table: where the decoder layers and their linears live.

Every pass and the calibration driver go through `adapter_for(model)`; nothing else names
attributes such as `model.layers` or `self_attn.q_proj`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.errors import UserError, choices


@dataclass(frozen=True)
class Adapter:
    layers_path: str            # attribute path from the CausalLM to the ModuleList of decoder layers
    embed_path: str             # token embedding
    final_norm_path: str
    rotary_path: str            # rotary embedding tables computed before layer 0
    lm_head_path: str
    attention: str              # attribute of a decoder layer
    mlp: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str
    input_norm: str
    post_attention_norm: str

    def linear_names(self) -> tuple[str, ...]:
        """Linear layers of one decoder layer, in execution order, relative to the layer."""
        a, m = self.attention, self.mlp
        return (f"{a}.{self.q}", f"{a}.{self.k}", f"{a}.{self.v}", f"{a}.{self.o}",
                f"{m}.{self.gate}", f"{m}.{self.up}", f"{m}.{self.down}")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)


_LLAMA_LIKE = Adapter(
    layers_path="model.layers", embed_path="model.embed_tokens", final_norm_path="model.norm",
    rotary_path="model.rotary_emb", lm_head_path="lm_head", attention="self_attn", mlp="mlp",
    q="q_proj", k="k_proj", v="v_proj", o="o_proj", gate="gate_proj", up="up_proj", down="down_proj",
    input_norm="input_layernorm", post_attention_norm="post_attention_layernorm",
)

# model_type -> adapter. Llama-family models share one layout.
ADAPTERS = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UserError(f"unsupported architecture {model_type!r}; supported: {choices(ADAPTERS)}")
    return ADAPTERS[model_type]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every linear layer inside the decoder layers, in order."""
    adapter = adapter_for(model)
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        for rel in adapter.linear_names():
            out.append((f"{adapter.layers_path}.{i}.{rel}", layer.get_submodule(rel)))
    return out


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` since transformers 5.2x renamed it,
    `past_key_values` before (5.17, for example, ignores an unknown `cache=` silently)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
