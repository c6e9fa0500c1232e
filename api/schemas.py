"""Request and response bodies of the HTTP API (camelCase, as the seed's clients send them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class TrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(3, ge=1, le=50, description="passes over the training data")
    batchSize: int = Field(4, ge=1, le=256, description="examples per micro-batch")
    learningRate: float = Field(2e-4, gt=0, le=0.01, description="peak learning rate")
    loraRank: int = Field(8, ge=1, le=256)
    loraAlpha: int = Field(16, ge=1, le=1024)
    loraDropout: float = Field(0.05, ge=0, lt=1)
    targetModules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    maxSeqLength: int = Field(256, ge=32, le=8192)
    gradientAccumulation: int = Field(1, ge=1, le=64)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    version: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
        description="model version; default: the job id",
    )
    autoDeploy: bool = Field(False, description="deploy the model when training succeeds")
    deployVersion: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
        description="tag of the auto-deployed model; default: the model version",
    )

    @field_validator("targetModules")
    @classmethod
    def _known_modules(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - LORA_MODULES)
        if unknown:
            raise ValueError(f"unknown module(s) {unknown}; choose from {sorted(LORA_MODULES)}")
        return value


class TrainAccepted(BaseModel):
    success: bool = True
    message: str
    jobId: str
    status: Literal["queued"] = "queued"
    datasetSize: int
    qualityScore: float


class DeployBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modelPath: str = Field(
        ...,
        max_length=1024,
        description="a trained model inside your models dir, e.g. ./models/<companyId>/<version>",
    )
    version: str = Field(..., max_length=200, description="tag of the deployed model, e.g. 1.0")
    outtype: Literal["f16", "q8_0"] | None = Field(None, description="GGUF weight type")
    quantize: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_]{1,16}$", description="Ollama quantization, e.g. q4_K_M"
    )


class DeployAccepted(BaseModel):
    success: bool = True
    message: str
    jobId: str
    status: Literal["queued"] = "queued"
    modelName: str


class Job(BaseModel):
    jobId: str
    queue: str
    companyId: str
    state: str
    progress: float
    stage: str = ""
    result: Any = None
    failedReason: str | None = None
    attemptsMade: int = 0
    timestamp: int | None = None
    processedOn: int | None = None
    finishedOn: int | None = None
    source: Literal["redis", "temporal"]


class LineErrorOut(BaseModel):
    file: str
    line: int
    message: str


class DatasetReportOut(BaseModel):
    totalLines: int
    valid: int
    invalid: int
    duplicates: int
    tooLong: int
    usable: int
    qualityScore: float
    errors: list[LineErrorOut]
    errorsTruncated: bool


class DatasetUploaded(BaseModel):
    success: bool
    message: str
    file: str | None
    report: DatasetReportOut
    tenantDatasetSize: int
    tenantQualityScore: float
