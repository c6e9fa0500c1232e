"""Generate from a GGUF with llama.cpp (llama-cpp-python): the local serving check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    text: str
    tokens: int
    latency_s: float
    tokens_per_s: float


def generate(
    gguf: Path, prompt: str, max_tokens: int = 48, seed: int = 0, temperature: float = 0.0
) -> Generation:
    """Load the model (CPU), complete `prompt`, and time it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, seed=seed, verbose=False, n_threads=2)
    try:
        t0 = time.perf_counter()
        out = llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=temperature, stop=["</s>", "[INST]"]
        )
        latency = time.perf_counter() - t0
    finally:
        llm.close()
    text = out["choices"][0]["text"]  # type: ignore[index]
    tokens = int(out["usage"]["completion_tokens"])  # type: ignore[index]
    return Generation(
        text=text,
        tokens=tokens,
        latency_s=latency,
        tokens_per_s=tokens / latency if latency > 0 else 0.0,
    )
