"""Inputs and results of every workflow and activity.

New fields always get defaults so histories recorded by older code still decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.spec import TrainingHyperparameters

__all__ = ["TrainingHyperparameters"]  # re-exported: workflow inputs carry the one spec


@dataclass
class JobOptions:
    """Bull's job options, as Temporal carries them out."""

    attempts: int = 2
    backoff_type: str = "exponential"  # or "fixed"
    backoff_delay_ms: int = 5000
    delay_ms: int = 0
    priority: int = 0  # Bull: 1 is the highest; 0 means none
    remove_on_complete: int = -1  # -1 keep all, 0 remove at once, N keep the newest N
    remove_on_fail: int = -1
    attempts_before: int = 0  # runs of this job id before this one (POST .../retry)


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
    auto_deploy: bool = False
    deploy_version: str = ""
    deploy_target: str = "local"
    options: JobOptions = field(default_factory=JobOptions)
    deploy_outtype: str = "f16"
    deploy_quantize: str = ""
    deploy_options: JobOptions = field(default_factory=JobOptions)
    deploy_heartbeat_timeout_s: int = 120


@dataclass
class ExportRequest:
    job_id: str
    company_id: str
    # The job's budget is checked again on the data actually exported (None: not checked).
    hyperparameters: TrainingHyperparameters | None = None
    base_model: str = ""


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
    base_short_name: str = ""
    deployment: dict[str, Any] | None = None


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
    keep: int = -1  # retention in the target collection: -1 all, 0 none, N newest N
    duration_s: float | None = None  # completed/failed: seconds since the run started


@dataclass
class DeployRequest:
    job_id: str
    company_id: str
    model_path: str
    version: str
    model_name: str
    target: str = "local"
    outtype: str = "f16"
    quantize: str = ""
    source_job: str = ""
    options: JobOptions = field(default_factory=JobOptions)
    # A worker that dies mid-step is noticed after this long, and the step retried elsewhere.
    heartbeat_timeout_s: int = 120


@dataclass
class ConvertRequest:
    job_id: str
    company_id: str
    model_path: str
    outtype: str = "f16"


@dataclass
class ConvertResult:
    gguf_path: str
    sha256: str
    size: int
    architecture: str
    tensor_count: int
    vocab_size: int
    converted: bool
    base_model: str = ""


@dataclass
class PublishRequest:
    job_id: str
    company_id: str
    model_name: str
    target: str
    gguf: ConvertResult
    source_model_path: str
    source_job: str = ""
    quantize: str = ""


@dataclass
class PublishResult:
    model_name: str
    target: str
    location: str
    digest: str
    created: bool  # this job published it (a retry included): a failed verification removes it
    replaced_previous: bool = False


@dataclass
class VerifyRequest:
    job_id: str
    company_id: str
    published: PublishResult
    max_tokens: int = 32


@dataclass
class VerifyResult:
    prompt: str
    text: str
    tokens: int
    latency_s: float
    tokens_per_s: float


@dataclass
class DeployResult:
    model_name: str
    target: str
    location: str
    digest: str
    gguf_path: str
    verification: VerifyResult


@dataclass
class QueueState:
    """The input of a queue's QueueControlWorkflow."""

    queue: str
    paused: bool = False
