"""Inputs and results of every workflow and activity.

New fields always get defaults so histories recorded by older code still decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingHyperparameters:
    epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    max_seq_len: int = 256
    grad_accum: int = 1
    seed: int = 42


@dataclass
class TrainRequest:
    job_id: str
    company_id: str
    hyperparameters: TrainingHyperparameters = field(default_factory=TrainingHyperparameters)
    base_model: str = ""
    version: str = ""
    train_timeout_s: int = 6 * 3600
    heartbeat_timeout_s: int = 60
    save_steps: int = 10


@dataclass
class ExportRequest:
    job_id: str
    company_id: str


@dataclass
class ExportResult:
    train_path: str
    validation_path: str
    dataset_size: int
    validation_size: int
    quality_score: float
    dataset_sha256: str


@dataclass
class TrainModelRequest:
    job_id: str
    company_id: str
    train_path: str
    validation_path: str
    base_model: str
    hyperparameters: TrainingHyperparameters
    save_steps: int = 10


@dataclass
class TrainModelResult:
    adapter_path: str
    base_model: str
    metrics: dict[str, Any]
    resumed_from_step: int = 0


@dataclass
class RegisterModelRequest:
    job_id: str
    company_id: str
    version: str
    adapter_path: str
    base_model: str
    hyperparameters: TrainingHyperparameters
    export: ExportResult
    metrics: dict[str, Any]


@dataclass
class TrainResult:
    model_path: str
    version: str
    base_model: str
    metrics: dict[str, Any]
    dataset_size: int
    quality_score: float


@dataclass
class JobProgress:
    """What the workflow's `progress` query answers."""

    stage: str
    progress: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class StatusUpdate:
    """One Bull-style state transition or progress change, mirrored into Redis."""

    job_id: str
    queue: str
    state: str
    progress: float | None = None
    result: dict[str, Any] | None = None
    failed_reason: str | None = None
    attempts_made: int | None = None
    stage: str = ""
    company_id: str = ""
    name: str = ""
