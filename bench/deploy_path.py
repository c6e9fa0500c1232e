"""Deployment path figures: GGUF conversion throughput and llama.cpp generation speed.

For the tiny base and a synthetic ~100M-parameter Mistral (random weights, built here), it
alternates N conversions through the `convert_to_gguf` activity (subprocess, read-back check,
sha256) with N bare `convert-hf-to-gguf` commands on the same input, and reports MB/s of
safetensors weights read, medians and the ratio. Then it times llama.cpp generation from the
tiny model's GGUF. Run: `python bench/deploy_path.py [--runs 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import BENCH_DIR, REDIS_URL, REPO, Row, Section, machine, median, span, today
from temporalio.testing import ActivityEnvironment

from activities.deployment import DeploymentActivities
from activities.status import StatusActivities
from tenanttune.mirror import JobMirror
from tenanttune.settings import Settings
from tenanttune.types import ConvertRequest
from training.base_model import build_tiny_base
from training.convert import TOKENIZER_FILES
from training.infer import generate

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
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    MistralForCausalLM(config).save_pretrained(str(tmp), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, tmp / name)
    tmp.rename(out)  # cached under .tenanttune/bench/ for the next run
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


def run(runs: int = 2) -> Section:
    root = Path(tempfile.mkdtemp(prefix="tt-bench-deploy-"))
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=root / "state",
        data_dir=root / "data",
        models_dir=root / "models",
        redis_url=REDIS_URL,
    )
    acts = DeploymentActivities(
        settings, StatusActivities(JobMirror.from_url(settings.redis_url), settings)
    )
    try:
        tiny_src = build_tiny_base(REPO / ".tenanttune" / "base" / "tiny-mistral")
        tiny = root / "tiny"
        shutil.copytree(tiny_src, tiny)
        big = build_synthetic(tiny, BENCH_DIR / "synthetic-110m")
        rows = []
        for label, model_dir in (("tiny Mistral", tiny), ("synthetic Mistral", big)):
            mb = weights_mb(model_dir)
            acts_s, bare_s = [], []
            through_activity(acts, model_dir)  # warm the page cache
            for _ in range(runs):
                acts_s.append(through_activity(acts, model_dir))
                bare_s.append(bare(model_dir, root / "bare.gguf"))
            for stale in model_dir.glob("model-f16.gguf*"):
                stale.unlink()
            rows.append((label, mb, acts_s, bare_s))
            print(f"  {label}: activity {acts_s}  bare {bare_s}", flush=True)
        through_activity(acts, tiny)
        gguf = tiny / "model-f16.gguf"
        prompt = "[INST] How do I download an invoice as PDF? [/INST]"
        gens = [generate(gguf, prompt, max_tokens=128) for _ in range(runs + 1)][1:]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"machine: {machine()} · date: {today()}",
        "",
        "The `convert_to_gguf` activity (run with Temporal's `ActivityEnvironment`: a "
        "`python -m training.convert` subprocess that calls the `convert-hf-to-gguf` converter, "
        "reads the GGUF back with `gguf`, then hashes it) against the bare `convert-hf-to-gguf "
        "<dir> --outtype f16` on the same full HF model directory, alternating, after one "
        "warm-up conversion. MB/s is safetensors weights read per second of wall time. The "
        "synthetic model is a randomly initialised Mistral (hidden 768, 14 layers, ~110 M "
        "parameters, f32) built by the script.",
        "",
        "| model | weights MB | path | runs | median s | MB/s | min–max s |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for label, mb, acts_s, bare_s in rows:
        for path, xs in (
            ("`convert_to_gguf` activity", acts_s),
            ("bare `convert-hf-to-gguf`", bare_s),
        ):
            med = median(xs)
            lines.append(
                f"| {label} | {mb:.1f} | {path} | {len(xs)} | {med:.2f} | {mb / med:.1f} | "
                f"{span(xs)} |"
            )
        ratio = median(acts_s) / median(bare_s)
        lines.append(f"| {label} | | **ratio activity / bare** | | **{ratio:.2f}** | | |")
        summary.append(
            Row(
                f"GGUF conversion, {label} ({mb:.0f} MB): MB/s",
                f"{mb / median(acts_s):.1f} (activity)",
                f"{mb / median(bare_s):.1f} (bare converter)",
                f"{ratio:.2f}× time",
            )
        )
    tps = [g.tokens_per_s for g in gens]
    lines += [
        "",
        f"llama.cpp generation from the deployed tiny model (f16 GGUF, llama-cpp-python, greedy, "
        f"{gens[0].tokens} new tokens, {len(gens)} runs after a warm-up): median "
        f"**{median(tps):.0f} tokens/s** (min {min(tps):.0f}, max {max(tps):.0f}).",
    ]
    summary.append(
        Row("llama.cpp generation, tiny deployed model: tokens/s", f"{median(tps):.0f}", "", "")
    )
    return Section(
        "Deployment path: GGUF conversion and llama.cpp generation",
        f"python bench/deploy_path.py --runs {runs}",
        "\n".join(lines),
        summary,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    print(run(args.runs).body)


if __name__ == "__main__":
    main()
