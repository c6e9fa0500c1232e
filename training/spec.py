"""The one hyperparameter spec: names, defaults, bounds and help of a LoRA fine-tune.

The API schema (camelCase aliases, bounds, defaults), the workflow input, the worker's check and
the training script's JSON config are all made from this dataclass, so they cannot disagree.
Pure Python: the training script imports it without torch, the core without ML libraries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _spec(alias: str, help: str, **bounds: Any) -> dict[str, Any]:  # noqa: A002 - argparse's name
    return {"alias": alias, "help": help, **bounds}


@dataclass
class TrainingHyperparameters:
    """What a tenant may choose for one fine-tuning job."""

    epochs: int = field(
        default=3, metadata=_spec("epochs", "passes over the training data", ge=1, le=50)
    )
    batch_size: int = field(
        default=4, metadata=_spec("batchSize", "examples per micro-batch", ge=1, le=256)
    )
    learning_rate: float = field(
        default=2e-4, metadata=_spec("learningRate", "peak AdamW learning rate", gt=0, le=0.01)
    )
    lora_r: int = field(default=8, metadata=_spec("loraRank", "LoRA rank", ge=1, le=256))
    lora_alpha: int = field(
        default=16, metadata=_spec("loraAlpha", "LoRA scaling alpha", ge=1, le=1024)
    )
    lora_dropout: float = field(
        default=0.05, metadata=_spec("loraDropout", "dropout on LoRA inputs", ge=0, lt=1)
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_spec(
            "targetModules", "projections that get a LoRA adapter", choices=LORA_MODULES
        ),
    )
    max_seq_len: int = field(
        default=256,
        metadata=_spec("maxSeqLength", "longer examples are truncated", ge=32, le=8192),
    )
    grad_accum: int = field(
        default=1,
        metadata=_spec("gradientAccumulation", "micro-batches per optimiser step", ge=1, le=64),
    )
    seed: int = field(
        default=42,
        metadata=_spec("seed", "seed for init, shuffling and dropout", ge=0, le=2**31 - 1),
    )

    def problems(self) -> list[str]:
        """Every bound this set breaks, as sentences naming the API field (empty when valid)."""
        found = []
        for f in fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            name = meta["alias"]
            if "choices" in meta:
                unknown = sorted(set(value) - set(meta["choices"]))
                if not value or unknown:
                    found.append(
                        f"{name} must be a non-empty list of {list(meta['choices'])}"
                        + (f"; unknown: {unknown}" if unknown else "")
                    )
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                found.append(f"{name} must be a number")
                continue
            for bound, ok, word in (
                ("ge", lambda v, b: v >= b, "at least"),
                ("gt", lambda v, b: v > b, "more than"),
                ("le", lambda v, b: v <= b, "at most"),
                ("lt", lambda v, b: v < b, "less than"),
            ):
                if bound in meta and not ok(value, meta[bound]):
                    found.append(f"{name} must be {word} {meta[bound]} (got {value})")
        return found

    def to_wire(self) -> dict[str, Any]:
        """camelCase, as clients send and read it."""
        return {f.metadata["alias"]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> TrainingHyperparameters:
        """From camelCase (API) or snake_case (config files) keys; unknown keys are ignored."""
        values = {}
        for f in fields(cls):
            for key in (f.metadata["alias"], f.name):
                if key in data:
                    values[f.name] = data[key]
                    break
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def wire_fields() -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(alias, type, default, metadata) of every hyperparameter, for building the API schema."""
    out = []
    for f in fields(TrainingHyperparameters):
        default = f.default_factory() if callable(f.default_factory) else f.default
        kind = {"int": int, "float": float, "list[str]": list[str]}[str(f.type)]
        out.append((f.metadata["alias"], kind, default, dict(f.metadata)))
    return out
