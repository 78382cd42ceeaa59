"""The lm-head pass: the output projection quantized, a tied embedding left float and untied,
stored bytes counted under lm_head, and a checkpoint that reloads to the same logits."""
import pytest
import torch

from compress.checkpoint import save_checkpoint
from compress.errors import UserError
from compress.evaluate.memory import weight_bytes
from compress.formats.int4 import Int4Linear
from compress.formats.int8 import Int8Linear
from compress.recipe import apply_recipe, recipe_from_dict
from compress.sources import load_model


def _lm_head(model, **fields):
    return apply_recipe(model, recipe_from_dict({"passes": [{"pass": "lm-head", **fields}]}, "r"))


@pytest.mark.parametrize("fields,cls,bound", [({"bits": 8}, Int8Linear, 0.02),
                                              ({"bits": 4, "group_size": 32}, Int4Linear, 0.2)])
def test_the_head_is_quantized_and_the_tied_embedding_stays_float(tiny_model, tokens, fields,
                                                                  cls, bound):
    assert tiny_model.config.tie_word_embeddings
    table = tiny_model.model.embed_tokens.weight.data.clone()
    with torch.no_grad():
        reference = tiny_model(tokens).logits
    model = _lm_head(tiny_model, **fields)
    assert isinstance(model.lm_head, cls) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, table)
    with torch.no_grad():
        out = model(tokens).logits
    assert 0 < (out - reference).norm() / reference.norm() < bound
    stored = sum(t.numel() * t.element_size() for t in model.lm_head.state_dict().values())
    assert weight_bytes(model)["lm_head"] == stored


def test_a_checkpoint_with_a_quantized_head_reloads_to_the_same_logits(tiny, tokens, tmp_path):
    model = _lm_head(tiny.model, bits=4, group_size=32)
    save_checkpoint(model, tiny.tokenizer, str(tmp_path / "ckpt"), None, tiny.provenance)
    reloaded = load_model(str(tmp_path / "ckpt")).model
    assert isinstance(reloaded.lm_head, Int4Linear) and not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_a_head_that_is_already_compressed_is_a_user_error(tiny_model):
    model = _lm_head(tiny_model, bits=8)
    with pytest.raises(UserError, match="lm_head is already compressed"):
        _lm_head(model, bits=8)
