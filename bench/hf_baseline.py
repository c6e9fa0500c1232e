"""The plain Hugging Face baseline for the training-throughput benchmark.

`transformers.Trainer` with the usual pad-to-longest collator, on what `training.train` gets:
the same base model loader, LoRA config, tokenisation (loss on assistant turns only), batch
size, learning rate, warm-up steps, seed and number of optimizer steps. Everything else is
Trainer's default (random sampler, no `group_by_length`, no dataloader workers, linear decay,
AdamW, grad-norm clip 1.0), except what does not touch the training math and only costs the
baseline time: no checkpoints (`save_strategy="no"`), no progress bar, no reporting
integrations. Eval loss before and after is computed with the same function as ours.

Prints one JSON line: train tokens (non-padding), train runtime, tokens/s, eval losses.
Run: `python bench/hf_baseline.py --base-model DIR --train-file F --eval-file F --output-dir D`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.spec import TrainingHyperparameters  # noqa: E402
from training.train import TrainConfig, add_lora, evaluate, load_base, load_split  # noqa: E402


class CountingCollator:
    """Pads to the longest example of each batch and counts the real (non-padding) tokens."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        self.real_tokens = 0
        self.padded_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.inner(features)
        self.real_tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += int(batch["attention_mask"].numel())
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    cfg = TrainConfig(
        base_model=args.base_model,
        train_file=args.train_file,
        output_dir=args.output_dir,
        eval_file=args.eval_file,
        hyperparameters=TrainingHyperparameters(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
        ),
    )
    hp = cfg.hyperparameters
    set_seed(hp.seed)
    tokenizer, model = load_base(cfg)
    model = add_lora(model, cfg)
    tokenizer.pad_token = tokenizer.eos_token  # the usual choice for a base without a pad token
    tokenizer.padding_side = "right"  # the usual for training (positions start at 0)
    pad_id = tokenizer.pad_token_id

    train_data = load_split(cfg.train_file, tokenizer, hp.max_seq_len)
    eval_data = load_split(cfg.eval_file, tokenizer, hp.max_seq_len)
    features = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        for ids, labels in train_data
    ]
    # The same warm-up length as training.train (warmup_ratio of the optimizer steps).
    total_steps = math.ceil(len(features) / hp.batch_size) * hp.epochs
    warmup = max(1, int(total_steps * cfg.warmup_ratio))

    first_eval = evaluate(model, eval_data, pad_id, hp.batch_size)
    collator = CountingCollator(tokenizer)
    training_args = TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=hp.batch_size,
        num_train_epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        warmup_steps=warmup,
        seed=hp.seed,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=features, data_collator=collator
    )
    out = trainer.train()
    last_eval = evaluate(model, eval_data, pad_id, hp.batch_size)
    model.save_pretrained(cfg.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(cfg.output_dir)
    runtime = float(out.metrics["train_runtime"])
    print(
        json.dumps(
            {
                "steps": int(out.global_step),
                "train_tokens": collator.real_tokens,
                "padded_tokens": collator.padded_tokens,
                "train_runtime_s": runtime,
                "tokens_per_s": collator.real_tokens / runtime,
                "first_eval_loss": first_eval,
                "eval_loss": last_eval,
                "torch_threads": torch.get_num_threads(),
                "finished_at": time.time(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
