"""Model directories for deployment tests, built from the tiny base."""

from __future__ import annotations

import shutil
from pathlib import Path

from training.convert import TOKENIZER_FILES


def mute_model(base_dir: Path, out: Path) -> Path:
    """A full HF model that always answers with end-of-sequence: an empty answer.

    Layers add nothing (o_proj, down_proj zero); every token embedding has a large first
    component, the final norm keeps only that component, and only the EOS row of the output
    layer reads it — so EOS wins at every position.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    eos = model.config.eos_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 5.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = 50.0
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / name)
    return out
