"""LoRA fine-tuning of a causal LM on a tenant's chat data.

Runs on its own (``python -m training.train --help``) and as the subprocess of the
`train_model` activity. It prints one JSON object per line on stdout:

* ``{"event": "start", "total_steps": ..., "resumed_from_step": ...}``
* ``{"event": "step", "step", "total_steps", "epoch", "loss", "lr", "tokens_per_s"}``
* ``{"event": "eval", "step", "eval_loss"}``
* ``{"event": "checkpoint", "step", "path"}``
* ``{"event": "done", "output_dir", "metrics"}``
* ``{"event": "error", "kind", "message"}`` (exit status 3: bad input, do not retry)

The script reads top to bottom: config, seed, model, data, optimiser, train, save.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.exits import (
    EXIT_BAD_INPUT,
    EXIT_NO_MEMORY,
    EXIT_NO_SPACE,
    disk_full_message,
    is_disk_full,
    is_out_of_memory,
)
from training.spec import TrainingHyperparameters

_LOADED_AT = time.perf_counter()  # before torch and transformers are imported


@dataclass
class TrainConfig:
    """One training run: where things are, plus the job's hyperparameters (training/spec.py).

    The script reads it as one JSON file (``--config run.json``); the activity writes that file.
    """

    base_model: str = field(metadata={"help": "HF model id or local dir (safetensors only)"})
    train_file: str = field(metadata={"help": "cleaned chat JSONL from the export step"})
    output_dir: str = field(metadata={"help": "where the adapter, config and metrics go"})
    hyperparameters: TrainingHyperparameters = field(default_factory=TrainingHyperparameters)
    eval_file: str = field(default="", metadata={"help": "validation split (chat JSONL)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps for LR warm-up"})
    save_steps: int = field(default=10, metadata={"help": "checkpoint every N optimiser steps"})
    checkpoint_dir: str = field(default="", metadata={"help": "default: <output_dir>-checkpoints"})
    resume_from_checkpoint: str = field(default="", metadata={"help": "checkpoint dir to resume"})
    max_steps: int = field(default=0, metadata={"help": "stop after N steps (0: all epochs)"})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise BadInput("InvalidHyperparametersError", "the config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput("InvalidHyperparametersError", f"unknown config keys: {unknown}")
        hp = TrainingHyperparameters.from_wire(data.pop("hyperparameters", None) or {})
        try:
            return cls(hyperparameters=hp, **data)
        except TypeError as exc:
            raise BadInput("InvalidHyperparametersError", f"config: {exc}") from exc


class BadInput(Exception):
    """Raised for input that no retry will fix; maps to exit status 3."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def emit(event: str, **data: Any) -> None:
    print(json.dumps({"event": event, **data}), flush=True)


def validate(cfg: TrainConfig) -> None:
    problems = cfg.hyperparameters.problems()
    if cfg.save_steps < 1:
        problems.append("save_steps must be at least 1")
    if problems:
        raise BadInput("InvalidHyperparametersError", "; ".join(problems))
    if not Path(cfg.train_file).is_file():
        raise BadInput("InvalidDatasetError", f"training file not found: {cfg.train_file}")


# --- model -----------------------------------------------------------------------------------


def load_base(cfg: TrainConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.base_model)
    if cfg.base_model.startswith(("/", "./", "../", "~")) and not path.exists():
        raise BadInput("BaseModelError", f"base model directory {path} does not exist")
    if path.exists():
        if not path.is_dir():
            raise BadInput("BaseModelError", f"base model must be a directory: {path}")
        if not any(path.glob("*.safetensors")):
            raise BadInput(
                "BaseModelError",
                f"no *.safetensors weights in {path}; pickled weights (.bin/.pt) are not loaded",
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base_model, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base_model, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        if not path.exists() and isinstance(exc, OSError):
            raise  # a hub id that did not download: maybe transient, let the job retry
        raise BadInput("BaseModelError", f"cannot load base model {cfg.base_model}: {exc}") from exc
    return tokenizer, model


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    modules = list(cfg.hyperparameters.target_modules)
    config = LoraConfig(
        r=cfg.hyperparameters.lora_r,
        lora_alpha=cfg.hyperparameters.lora_alpha,
        lora_dropout=cfg.hyperparameters.lora_dropout,
        target_modules=modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise BadInput("InvalidHyperparametersError", f"target_modules: {exc}") from exc


# --- data ------------------------------------------------------------------------------------


def encode(
    messages: list[dict[str, str]], tokenizer: Any, max_len: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels; only the assistant's turns (and their EOS) are learned."""
    from training.chat import segments

    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels = [-100] * len(ids)
    for text, is_target in segments(messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_target:
            piece = [*piece, tokenizer.eos_token_id]
        ids.extend(piece)
        labels.extend(piece if is_target else [-100] * len(piece))
    return ids[:max_len], labels[:max_len]


def load_split(path: str, tokenizer: Any, max_len: int) -> list[tuple[list[int], list[int]]]:
    from training.dataset import read_examples

    out = []
    for messages in read_examples(Path(path)):
        ids, labels = encode(messages, tokenizer, max_len)
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    return out


def epoch_batches(n_items: int, lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within windows of 50 batches, shuffle the batches.

    Deterministic for a given seed, so a resumed run sees the same order.
    """
    rng = random.Random(seed)
    order = list(range(n_items))
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, n_items, window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def evaluate(model: Any, data: list[tuple[list[int], list[int]]], pad_id: int, bs: int) -> float:
    """Mean loss per target token over the validation split."""
    import torch

    model.eval()
    total, count = 0.0, 0
    # Batches of similar length: less padding to compute; the sum does not depend on order.
    ordered = sorted(data, key=lambda item: len(item[0]))
    with torch.no_grad():
        for start in range(0, len(ordered), bs):
            batch = collate(ordered[start : start + bs], pad_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = batch["labels"][:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                shift_logits, shift_labels, ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((shift_labels != -100).sum())
    model.train()
    return total / max(count, 1)


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], dir_: Path
) -> Path:
    """Write a checkpoint to a temp dir and rename it into place, keeping the last two."""
    import torch

    dir_.mkdir(parents=True, exist_ok=True)
    final = dir_ / f"checkpoint-{state['step']}"
    tmp = dir_ / f".checkpoint-{state['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            # Dropout draws from it: a resumed run continues the same random stream.
            "rng": torch.get_rng_state(),
        },
        tmp / "optimizer.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted(dir_.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in done[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(model: Any, optimizer: Any, scheduler: Any, path: Path) -> dict[str, Any]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise BadInput("TrainingFailedError", f"checkpoint {path} has no adapter_model.safetensors")
    set_peft_model_state_dict(model, load_file(str(weights)))
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if "rng" in opt:  # checkpoints written before it was saved resume all the same
        torch.set_rng_state(opt["rng"])
    state: dict[str, Any] = json.loads((path / "trainer_state.json").read_text())
    return state


# --- main ------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    import torch

    validate(cfg)
    random.seed(cfg.hyperparameters.seed)
    torch.manual_seed(cfg.hyperparameters.seed)

    tokenizer, model = load_base(cfg)
    model = add_lora(model, cfg)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    train_data = load_split(cfg.train_file, tokenizer, cfg.hyperparameters.max_seq_len)
    eval_data = (
        load_split(cfg.eval_file, tokenizer, cfg.hyperparameters.max_seq_len)
        if cfg.eval_file
        else []
    )
    if not train_data:
        raise BadInput("InvalidDatasetError", f"no trainable examples in {cfg.train_file}")
    lengths = [len(ids) for ids, _ in train_data]
    # Per example, the tokens whose next token is learned: the loss's denominator, counted once.
    n_targets_of = [sum(lab != -100 for lab in labels[1:]) for _, labels in train_data]

    batches_per_epoch = math.ceil(len(train_data) / cfg.hyperparameters.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.hyperparameters.grad_accum)
    total_steps = steps_per_epoch * cfg.hyperparameters.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.hyperparameters.learning_rate,
        weight_decay=0.0,
    )
    warmup = max(1, int(total_steps * cfg.warmup_ratio))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    state: dict[str, Any] = {"step": 0, "loss_history": [], "eval_history": [], "train_tokens": 0}
    if cfg.resume_from_checkpoint:
        state = load_checkpoint(model, optimizer, scheduler, Path(cfg.resume_from_checkpoint))
    resumed_from = int(state["step"])
    out = Path(cfg.output_dir)
    checkpoint_dir = (
        Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.with_name(f"{out.name}-checkpoints")
    )
    emit(
        "start",
        total_steps=total_steps,
        resumed_from_step=resumed_from,
        train_examples=len(train_data),
        eval_examples=len(eval_data),
        load_s=round(time.perf_counter() - _LOADED_AT, 3),
    )

    eval_s = 0.0
    if eval_data and not state["eval_history"]:
        t_eval = time.perf_counter()
        first = evaluate(model, eval_data, pad_id, cfg.hyperparameters.batch_size)
        eval_s += time.perf_counter() - t_eval
        state["eval_history"].append([0, first])
        emit("eval", step=0, eval_loss=first)

    model.train()
    step = resumed_from
    started = time.perf_counter()
    tokens_this_run, computed_this_run, eval_in_loop_s = 0, 0, 0.0
    while step < total_steps:
        epoch = step // steps_per_epoch
        batches = epoch_batches(
            len(train_data),
            lengths,
            cfg.hyperparameters.batch_size,
            cfg.hyperparameters.seed + epoch,
        )
        first_batch = (step - epoch * steps_per_epoch) * cfg.hyperparameters.grad_accum
        for group_start in range(first_batch, len(batches), cfg.hyperparameters.grad_accum):
            t0 = time.perf_counter()
            group = batches[group_start : group_start + cfg.hyperparameters.grad_accum]
            n_targets = sum(n_targets_of[i] for b in group for i in b)
            step_loss_t = torch.zeros(())
            step_tokens = 0
            for batch_idx in group:
                batch = collate([train_data[i] for i in batch_idx], pad_id)
                real = sum(lengths[i] for i in batch_idx)
                step_tokens += real
                computed_this_run += batch["input_ids"].numel()
                # No padding in this batch: no mask, so attention takes its plain causal path.
                mask = batch["attention_mask"] if real < batch["input_ids"].numel() else None
                logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)),
                    batch["labels"][:, 1:].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ) / max(n_targets, 1)
                loss.backward()
                step_loss_t += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # One read of the loss per optimizer step (not per micro-batch): on an accelerator
            # each read waits for the device.
            step_loss = float(step_loss_t)
            tokens_this_run += step_tokens
            state["train_tokens"] += step_tokens
            state["loss_history"].append([step, step_loss])
            emit(
                "step",
                step=step,
                total_steps=total_steps,
                epoch=epoch + 1,
                loss=round(step_loss, 5),
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=round(step_tokens / max(time.perf_counter() - t0, 1e-9), 1),
            )
            end_of_epoch = step % steps_per_epoch == 0
            if eval_data and (end_of_epoch or step == total_steps):
                t_eval = time.perf_counter()
                eval_loss = evaluate(model, eval_data, pad_id, cfg.hyperparameters.batch_size)
                eval_in_loop_s += time.perf_counter() - t_eval
                state["eval_history"].append([step, eval_loss])
                emit("eval", step=step, eval_loss=eval_loss)
            state["step"] = step
            if step % cfg.save_steps == 0 and step < total_steps:
                path = save_checkpoint(model, optimizer, scheduler, state, checkpoint_dir)
                emit("checkpoint", step=step, path=str(path))
            if step >= total_steps or end_of_epoch:
                break

    runtime = time.perf_counter() - started
    train_s = runtime - eval_in_loop_s  # optimizer steps and checkpoints, not evaluation
    metrics = {
        "steps": step,
        "total_steps": total_steps,
        "resumed_from_step": resumed_from,
        "train_loss": state["loss_history"][-1][1] if state["loss_history"] else None,
        "loss_history": state["loss_history"],
        "eval_history": state["eval_history"],
        "first_eval_loss": state["eval_history"][0][1] if state["eval_history"] else None,
        "eval_loss": state["eval_history"][-1][1] if state["eval_history"] else None,
        "train_tokens": state["train_tokens"],
        "tokens_per_s": round(tokens_this_run / train_s, 1) if train_s > 0 else 0.0,
        "runtime_s": round(runtime, 3),
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s + eval_in_loop_s, 3),
        "computed_tokens": computed_this_run,
        "train_examples": len(train_data),
        "eval_examples": len(eval_data),
    }
    save_final(model, tokenizer, cfg, metrics)
    emit(
        "done",
        output_dir=cfg.output_dir,
        metrics={k: v for k, v in metrics.items() if not k.endswith("_history")},
    )
    return metrics


def save_final(model: Any, tokenizer: Any, cfg: TrainConfig, metrics: dict[str, Any]) -> None:
    """Adapter, tokenizer, effective config and metrics, published by one rename."""
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config",
        required=True,
        help="JSON file: base_model, train_file, output_dir, eval_file, hyperparameters {...}, "
        "save_steps, checkpoint_dir, resume_from_checkpoint, max_steps, warmup_ratio",
    )
    args = parser.parse_args(argv)
    return TrainConfig.from_json(Path(args.config).read_text())


def main(argv: list[str] | None = None) -> int:
    # A cancelled job's SIGTERM: exit through `finally` blocks, so temp dirs are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cfg = parse_args(argv)
    except BadInput as exc:
        emit("error", kind=exc.kind, message=str(exc))
        return EXIT_BAD_INPUT
    try:
        train(cfg)
    except BadInput as exc:
        emit("error", kind=exc.kind, message=str(exc))
        return EXIT_BAD_INPUT
    except Exception as exc:  # a full disk can surface from any writer (torch, safetensors)
        if is_out_of_memory(exc):
            why = str(exc) or type(exc).__name__
            emit("error", kind="ResourceLimitError", message=f"out of memory: {why}"[:500])
            return EXIT_NO_MEMORY
        if not is_disk_full(exc):
            raise
        near = Path(cfg.checkpoint_dir or cfg.output_dir)
        emit("error", kind="DiskFullError", message=disk_full_message(exc, near))
        return EXIT_NO_SPACE
    return 0


if __name__ == "__main__":
    sys.exit(main())
