"""The base model: a configured one, or a tiny Mistral built here from the sample data.

The tiny model lets tests and the demo run on machines with no model hub and no GPU:
a SentencePiece BPE tokenizer trained on the shipped examples and a randomly initialised
(fixed seed) two-layer Mistral. It is built once and cached.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from training.chat import INST_CLOSE, INST_OPEN, segments

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
TINY_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "seed": 0,
}
TINY_SHORT_NAME = "tiny-mistral"
ROUNDTRIP_SAMPLES = [
    "Settings → Billing → Tax",
    "Where is pallet GX-48213? Ünïcode ok.",
    "[INST] hi",
]


def _corpus_lines(examples_dir: Path) -> list[str]:
    from training.dataset import iter_lines, parse_line

    lines: list[str] = []
    for _, _, raw in iter_lines(sorted(examples_dir.glob("tenants/*/*.jsonl"))):
        example, _ = parse_line(raw)
        if example is not None:
            lines.extend(text.strip() for text, _ in segments(example.messages))
    if not lines:
        raise FileNotFoundError(f"no sample data under {examples_dir}/tenants to build a tokenizer")
    return lines


def tiny_fingerprint(
    examples_dir: Path = EXAMPLES_DIR, config: dict[str, int] | None = None
) -> str:
    h = hashlib.sha256(json.dumps(config or TINY_CONFIG, sort_keys=True).encode())
    for path in sorted(examples_dir.glob("tenants/*/*.jsonl")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_tiny_base(
    target: Path, examples_dir: Path = EXAMPLES_DIR, config: dict[str, int] | None = None
) -> Path:
    """Build (or reuse) the tiny base model at `target`. Safe to call from several processes.

    `config` (keys as in TINY_CONFIG) builds a bigger model of the same kind, e.g. the ~30M
    one the training benchmark uses; the default is the tiny model of tests and the demo.
    """
    config = config or TINY_CONFIG
    fingerprint = tiny_fingerprint(examples_dir, config)
    stamp = target / "tenanttune-base.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _build(tmp, examples_dir, config)
            stamp_data = {"fingerprint": fingerprint, "config": config}
            (tmp / "tenanttune-base.json").write_text(json.dumps(stamp_data, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path, examples_dir: Path, config: dict[str, int]) -> None:
    import sentencepiece as spm
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines(examples_dir)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=config["vocab_size"],
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[INST_OPEN, INST_CLOSE],
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    # transformers 5: the vocab_file constructor returns empty encodings; from_pretrained works.
    tok = LlamaTokenizer.from_pretrained(str(out), vocab_file=str(out / "tokenizer.model"))
    for text in ROUNDTRIP_SAMPLES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        back = tok.decode(ids, skip_special_tokens=True)
        if not ids or back.strip() != text:
            raise RuntimeError(f"tokenizer does not round-trip {text!r}: got {back!r} from {ids}")
    tok.save_pretrained(str(out))

    torch.manual_seed(config["seed"])
    model_config = MistralConfig(
        vocab_size=tok.vocab_size,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(model_config).save_pretrained(str(out), safe_serialization=True)


def resolve_base_model(configured: str, tiny_dir: Path) -> str:
    """The base model to train on: the configured name or path, else the tiny local model."""
    if configured:
        return configured
    return str(build_tiny_base(tiny_dir))


def short_name(base_model: str) -> str:
    """A short, tag-safe name for a base: `mistral-7b` for Mistral-7B-v0.3, `tiny-mistral` here."""
    path = Path(base_model)
    stamp = path / "tenanttune-base.json"
    if stamp.exists():
        return TINY_SHORT_NAME
    name = base_model.rstrip("/").split("/")[-1].lower()
    for known in ("mistral-7b", "llama-3-8b", "llama-2-7b", "mixtral-8x7b"):
        if name.startswith(known):
            return known
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name)[:40] or "model"


if __name__ == "__main__":
    import sys

    print(
        build_tiny_base(
            Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".tenanttune/base/tiny-mistral")
        )
    )
