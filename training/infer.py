"""Generate from a GGUF with llama.cpp (llama-cpp-python): the local serving check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
        out: Any = llm.create_completion(
            prompt, max_tokens=max_tokens, temperature=temperature, stop=["</s>", "[INST]"]
        )
        latency = time.perf_counter() - t0
    finally:
        llm.close()
    text = out["choices"][0]["text"]
    tokens = int(out["usage"]["completion_tokens"])
    return Generation(
        text=text,
        tokens=tokens,
        latency_s=latency,
        tokens_per_s=tokens / latency if latency > 0 else 0.0,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m training.infer <model.gguf> <prompt>`: one completion, printed as JSON."""
    import argparse
    import json
    from dataclasses import asdict

    parser = argparse.ArgumentParser(prog="python -m training.infer", description=main.__doc__)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        result = generate(args.gguf, args.prompt, max_tokens=args.max_tokens)
    except (ValueError, OSError, RuntimeError) as exc:
        print(
            json.dumps({"event": "error", "message": f"llama.cpp could not run {args.gguf}: {exc}"})
        )
        return 3
    print(json.dumps({"event": "done", **asdict(result)}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
