"""A model saved as a compress checkpoint and reloaded, for the checkpoint tests."""
import json

import torch
from transformers import AutoModelForCausalLM

from compress.checkpoint import load_checkpoint, save_checkpoint


def reload_exactly(model, tokens, folder, stock: bool = False):
    """`model` saved to `folder` and reloaded by compress (and by stock transformers too when
    `stock`, which needs uniform shapes); each reload must give the same logits on `tokens`, bit
    for bit. Returns (compress's reloaded model, the checkpoint's compress.json)."""
    with torch.no_grad():
        before = model(tokens).logits
        save_checkpoint(model, None, str(folder), None, {})
        reloaded = load_checkpoint(str(folder)).model
        assert torch.equal(reloaded(tokens).logits, before)
        if stock:
            assert torch.equal(AutoModelForCausalLM.from_pretrained(str(folder))(tokens).logits,
                               before)
    return reloaded, json.loads((folder / "compress.json").read_text())
