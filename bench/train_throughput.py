"""Training throughput: `python -m training.train` against a plain Hugging Face Trainer baseline.

Both train the same ~26M-parameter Mistral-architecture base (built here, random weights, the
tiny model's tokenizer) with the same LoRA config, data, tokenisation, batch size, learning
rate and number of optimizer steps, as separate processes, alternating ours, baseline,
baseline, ours, … It reports trained tokens per second (real, non-padding tokens; time in the
training loop, evaluation excluded), the whole command's wall time, eval loss before → after
(same function for both) and each process's peak RSS.
Run: `python bench/train_throughput.py [--runs 2] [--steps 10]`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import BENCH_DIR, REPO, Row, Section, machine, median, run_measured, span, today

from training.base_model import build_tiny_base
from training.spec import TrainingHyperparameters
from training.train import TrainConfig

# ~26M parameters: 8 layers of hidden 512 (GQA 8/4 heads), SwiGLU 1536, vocab 512.
BENCH_MODEL = {
    "vocab_size": 512,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "seed": 0,
}
BATCH = 8
LR = 1e-3
MAX_SEQ = 512
EVAL_EXAMPLES = 24
# Turns per conversation: most tenant chats are one question, some go on for several.
TURN_WEIGHTS = {1: 45, 2: 25, 3: 14, 4: 8, 5: 5, 6: 3}


def build_data(out_dir: Path, n_train: int, seed: int = 7) -> tuple[Path, Path]:
    """Tenant-like chats with a long-tailed spread of lengths, from both sample tenants.

    Each conversation chains 1–6 question/answer pairs of one tenant under its system prompt.
    """
    rng = random.Random(seed)
    pools: list[list[list[dict[str, str]]]] = []
    for tenant in sorted((REPO / "examples" / "tenants").iterdir()):
        pool = []
        for path in sorted(tenant.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                obj = json.loads(line)
                msgs = obj.get("messages") or [
                    {"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]},
                ]
                pool.append(msgs)
        pools.append(pool)
    turns, weights = zip(*TURN_WEIGHTS.items(), strict=True)

    def conversation() -> list[dict[str, str]]:
        pool = rng.choice(pools)
        picks = rng.sample(pool, rng.choices(turns, weights)[0])
        system = [m for m in picks[0] if m["role"] == "system"]
        return system + [m for p in picks for m in p if m["role"] != "system"]

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / "train.jsonl", out_dir / "eval.jsonl")
    for path, n in zip(paths, (n_train, EVAL_EXAMPLES), strict=True):
        lines = [json.dumps({"messages": conversation()}, ensure_ascii=False) for _ in range(n)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


@dataclass
class Run:
    side: str
    tokens_per_s: float
    train_s: float
    wall_s: float
    first_eval: float
    eval_loss: float
    rss_mb: float
    tokens: int
    padding: float  # share of computed positions that were padding
    cpu_s: float  # CPU seconds of the whole command

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s


def ours(model: Path, train: Path, eval_: Path, out: Path) -> Run:
    hp = TrainingHyperparameters(epochs=1, batch_size=BATCH, learning_rate=LR, max_seq_len=MAX_SEQ)
    cfg = TrainConfig(str(model), str(train), str(out), hyperparameters=hp, eval_file=str(eval_))
    config = out.with_name(out.name + "-config.json")
    config.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "training.train", "--config", str(config)]
    done = run_measured(cmd)
    events = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    m: dict[str, Any] = next(e for e in events if e["event"] == "done")["metrics"]
    train_s = float(m["train_s"])
    return Run(
        "ours", m["train_tokens"] / train_s, train_s, done.wall_s, m["first_eval_loss"],
        m["eval_loss"], done.peak_rss_mb, m["train_tokens"],
        1 - m["train_tokens"] / max(m["computed_tokens"], 1), done.cpu_s,
    )  # fmt: skip


def baseline(model: Path, train: Path, eval_: Path, out: Path) -> Run:
    cmd = [
        sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--base-model", str(model),
        "--train-file", str(train), "--eval-file", str(eval_), "--output-dir", str(out),
        "--epochs", "1", "--batch-size", str(BATCH), "--learning-rate", str(LR),
        "--max-seq-len", str(MAX_SEQ), "--seed", "42",
    ]  # fmt: skip
    done = run_measured(cmd)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(
        "hf", m["tokens_per_s"], m["train_runtime_s"], done.wall_s, m["first_eval_loss"],
        m["eval_loss"], done.peak_rss_mb, m["train_tokens"],
        1 - m["train_tokens"] / max(m["padded_tokens"], 1), done.cpu_s,
    )  # fmt: skip


def run(runs: int = 2, steps: int = 10) -> Section:
    model = build_tiny_base(BENCH_DIR / "mistral-26m", config=BENCH_MODEL)
    root = Path(tempfile.mkdtemp(prefix="tt-bench-throughput-"))
    results: list[Run] = []
    try:
        train, eval_ = build_data(root / "data", steps * BATCH)
        order = ["ours", "hf", "hf", "ours"] * ((runs + 1) // 2)
        for i, side in enumerate(order[: 2 * runs]):
            fn = ours if side == "ours" else baseline
            r = fn(model, train, eval_, root / f"out-{i}")
            shutil.rmtree(root / f"out-{i}", ignore_errors=True)
            shutil.rmtree(root / f"out-{i}-checkpoints", ignore_errors=True)
            results.append(r)
            print(
                f"  {side:4} {r.tokens_per_s:7.1f} tok/s  train {r.train_s:6.1f} s  "
                f"wall {r.wall_s:6.1f} s  eval {r.first_eval:.3f}→{r.eval_loss:.3f}  "
                f"RSS {r.rss_mb:5.0f} MB  padding {100 * r.padding:4.1f} %",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(results, runs, steps)


def report(results: list[Run], runs: int, steps: int) -> Section:
    by = {s: [r for r in results if r.side == s] for s in ("ours", "hf")}

    def med(side: str, attr: str) -> float:
        return median([getattr(r, attr) for r in by[side]])

    def rng(side: str, attr: str, fmt: str = ".1f") -> str:
        return span([getattr(r, attr) for r in by[side]], fmt)

    lines = [
        f"machine: {machine()} · date: {today()}",
        "",
        f"workload: ~26M-parameter Mistral (hidden 512, 8 layers, vocab 512, random init, f32), "
        f"LoRA r 8 / alpha 16 / dropout 0.05 on q,k,v,o; {steps * BATCH} training chats "
        f"(1–6 turns, both sample tenants), {EVAL_EXAMPLES} eval chats, batch {BATCH}, lr {LR}, "
        f"max length {MAX_SEQ}, 1 epoch = {steps} optimizer steps, seed 42; "
        f"{runs} runs per side, alternating ours, HF, HF, ours.",
        "",
        "| side | runs | tokens/s median | min–max | train loop s | command wall s | "
        "tokens per CPU-s (command) | eval loss before → after | padding share | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "ours": "ours: `python -m training.train`",
        "hf": "baseline: `transformers.Trainer`, pad-to-longest",
    }
    for side in ("ours", "hf"):
        lines.append(
            f"| {names[side]} | {len(by[side])} | {med(side, 'tokens_per_s'):.0f} | "
            f"{rng(side, 'tokens_per_s', '.0f')} | {med(side, 'train_s'):.1f} | "
            f"{med(side, 'wall_s'):.1f} | {med(side, 'tokens_per_cpu_s'):.0f} | "
            f"{med(side, 'first_eval'):.3f} → "
            f"{med(side, 'eval_loss'):.3f} | {100 * med(side, 'padding'):.0f} % | "
            f"{med(side, 'rss_mb'):.0f} |"
        )
    tps = med("ours", "tokens_per_s") / med("hf", "tokens_per_s")
    wall = med("hf", "wall_s") / med("ours", "wall_s")
    lines.append(
        f"| **ratio ours / HF** | | **{tps:.2f}×** | | | {wall:.2f}× faster | "
        f"{med('ours', 'tokens_per_cpu_s') / med('hf', 'tokens_per_cpu_s'):.2f}× | "
        f"{med('ours', 'eval_loss') - med('hf', 'eval_loss'):+.3f} | | "
        f"{med('ours', 'rss_mb') / med('hf', 'rss_mb'):.2f}× |"
    )
    rows = [
        Row(
            "training throughput, tokens/s (26M Mistral, LoRA)",
            f"{med('ours', 'tokens_per_s'):.0f}",
            f"{med('hf', 'tokens_per_s'):.0f} (HF Trainer)",
            f"{tps:.2f}×",
            "≥ 1.3×",
        ),
        Row(
            "eval loss after training (lower is better)",
            f"{med('ours', 'eval_loss'):.3f}",
            f"{med('hf', 'eval_loss'):.3f}",
            f"{med('ours', 'eval_loss') - med('hf', 'eval_loss'):+.3f}",
            "≤ +0",
        ),
        Row(
            "training peak RSS, MB",
            f"{med('ours', 'rss_mb'):.0f}",
            f"{med('hf', 'rss_mb'):.0f}",
            f"{med('ours', 'rss_mb') / med('hf', 'rss_mb'):.2f}×",
        ),
    ]
    return Section(
        "Training throughput: ours vs Hugging Face Trainer",
        "python bench/train_throughput.py " + f"--runs {runs} --steps {steps}",
        "\n".join(lines),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per side")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps (one epoch)")
    args = parser.parse_args()
    section = run(args.runs, args.steps)
    print(section.body)


if __name__ == "__main__":
    main()
