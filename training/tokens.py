"""How many tokens a tenant's examples are, counted with the base model's own tokenizer.

Uses the `tokenizers` library on the base's `tokenizer.json` (what transformers itself runs),
so the API and the worker can count without importing torch, and the count is the one the
training script sees: BOS, the chat segments, EOS after each answer, cut at maxSeqLength.
Without a local tokenizer (a hub id not downloaded here) it gives an upper bound instead:
one token per UTF-8 byte, which no byte-fallback BPE/SentencePiece tokenizer exceeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from training.chat import Message, segments


@dataclass
class TokenCount:
    tokens: int  # per epoch, after truncation
    truncated: int  # examples longer than max_len
    examples: int
    exact: bool  # False: an upper bound (no local tokenizer)


@lru_cache(maxsize=8)
def _load(path: str, _mtime_ns: int) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenizer_of(base_model: str | Path) -> Any | None:
    """The base model's tokenizer, if it is a local directory with a tokenizer.json."""
    file = Path(base_model) / "tokenizer.json"
    try:
        return _load(str(file), file.stat().st_mtime_ns)
    except (OSError, ValueError, Exception):  # noqa: BLE001 - a missing or odd file: no tokenizer
        return None


def example_tokens(tokenizer: Any | None, messages: Sequence[Message]) -> int:
    """Tokens of one example before truncation (an upper bound without a tokenizer)."""
    pieces = segments(messages)
    if tokenizer is None:
        return 1 + sum(len(text.encode()) + (1 if target else 0) for text, target in pieces)
    texts = [text for text, _ in pieces]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    return 1 + sum(
        len(e.ids) + (1 if target else 0) for e, (_, target) in zip(encoded, pieces, strict=True)
    )


def count(
    base_model: str | Path, conversations: Iterable[Sequence[Message]], max_len: int
) -> TokenCount:
    tokenizer = tokenizer_of(base_model)
    tokens = truncated = examples = 0
    for messages in conversations:
        n = example_tokens(tokenizer, messages)
        examples += 1
        if n > max_len:
            truncated += 1
        tokens += min(n, max_len)
    return TokenCount(tokens, truncated, examples, exact=tokenizer is not None)
