"""Real model shapes for `random:<shape>` sources: speed does not depend on trained weights."""
from __future__ import annotations

from compress.errors import UserError, choices

# Fields of transformers.LlamaConfig. Figures from the models' published configs (PROTOCOL.md).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192,
                      rms_norm_eps=1e-5),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        # Llama 3.1+ long-context RoPE (the published rope_scaling)
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5),
    # For tests: every width divisible by 32 and 64, GQA, tied embeddings, vocab above 256 bytes.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=True,
                 rope_theta=10000.0, max_position_embeddings=2048, rms_norm_eps=1e-5),
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise UserError(f"unknown random shape {shape!r}; allowed: {choices(SHAPES)}")
    fields = dict(SHAPES[shape])
    rope = {"rope_type": "default", **fields.pop("rope_scaling", {}),
            "rope_theta": fields.pop("rope_theta")}
    return LlamaConfig(**fields, rope_parameters=rope,
                       initializer_range=0.02, bos_token_id=256, eos_token_id=257, pad_token_id=257)
