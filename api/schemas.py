"""Request and response bodies of the HTTP API (camelCase, as the seed's clients send them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from jobs.service import RequestedOptions
from tenanttune.vocab import TAG_RE
from training.spec import TrainingHyperparameters, wire_fields

# pydantic's default (Rust) regex engine reads `$` as the end of the text, never "before a
# trailing newline" as Python's `re` does: "m1\n" is refused (tests/unit/test_api.py).
TAG_PATTERN = f"^{TAG_RE.pattern}$"
DAY_MS = 24 * 3600 * 1000


class Backoff(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["fixed", "exponential"] = "exponential"
    delay: int = Field(5000, ge=0, le=3600 * 1000, description="ms before the first retry")


class JobOptionsBody(BaseModel):
    """Bull's job options, accepted on every job-creating request."""

    model_config = ConfigDict(extra="forbid")

    attempts: int | None = Field(None, ge=1, le=20, description="tries of the main step")
    backoff: Backoff | None = Field(None, description="wait between tries")
    delay: int = Field(0, ge=0, le=30 * DAY_MS, description="ms before the job may start")
    priority: int | None = Field(None, ge=1, le=5, description="1 is the highest")
    jobId: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description="your id for the job: the same jobId returns the same job",
    )
    removeOnComplete: bool | int | None = Field(
        None, description="true: forget at once; N: keep the newest N completed"
    )
    removeOnFail: bool | int | None = Field(None, description="like removeOnComplete")

    def requested_options(self) -> RequestedOptions:
        return RequestedOptions(
            attempts=self.attempts,
            backoff_type=self.backoff.type if self.backoff else None,
            backoff_delay_ms=self.backoff.delay if self.backoff else None,
            delay_ms=self.delay,
            priority=self.priority or 0,
            remove_on_complete=_retention(self.removeOnComplete),
            remove_on_fail=_retention(self.removeOnFail),
        )

    def sent(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(Bull's job.data, job.opts) as the client sent them, for the mirror."""
        options = set(JobOptionsBody.model_fields)
        return (
            self.model_dump(exclude_none=True, exclude=options),
            self.model_dump(exclude_none=True, include=options),
        )


def _retention(value: bool | int | None) -> int:
    if value is True:
        return 0
    if value is None or value is False:
        return -1
    return max(int(value), 0)


def _hyperparameter_fields() -> dict[str, Any]:
    """TrainBody's hyperparameter fields, made from the one spec (training/spec.py)."""
    out: dict[str, Any] = {}
    for alias, kind, default, meta in wire_fields():
        bounds: dict[str, Any] = {k: meta[k] for k in ("ge", "gt", "le", "lt") if k in meta}
        if "choices" in meta:
            kind = Annotated[list[str], AfterValidator(_one_of(alias, meta["choices"]))]
            bounds["min_length"] = 1
        out[alias] = (kind, Field(default, description=meta["help"], **bounds))
    return out


def _one_of(name: str, choices: tuple[str, ...]) -> Any:
    def check(value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(choices))
        if unknown:
            raise ValueError(f"unknown {name} {unknown}; choose from {sorted(choices)}")
        return value

    return check


_HyperparametersBody: Any = create_model(
    "HyperparametersBody", __base__=JobOptionsBody, **_hyperparameter_fields()
)


class TrainBody(_HyperparametersBody):  # type: ignore[misc]
    """The hyperparameters (from the spec), Bull's job options, and what to do with the model."""

    version: str | None = Field(
        None,
        pattern=TAG_PATTERN,
        description="model version; default: the job id",
    )
    baseModel: str | None = Field(
        None,
        max_length=200,
        description="a base model from the server's allow-list (ALLOWED_BASE_MODELS); "
        "default: its BASE_MODEL",
    )
    autoDeploy: bool = Field(False, description="deploy the model when training succeeds")
    deployVersion: str | None = Field(
        None,
        pattern=TAG_PATTERN,
        description="tag of the auto-deployed model; default: the model version",
    )

    def hyperparameters(self) -> TrainingHyperparameters:
        return TrainingHyperparameters.from_wire(self.model_dump())


class TrainAccepted(BaseModel):
    success: bool = True
    message: str
    jobId: str
    status: Literal["queued"] = "queued"
    datasetSize: int
    qualityScore: float


class DeployBody(JobOptionsBody):
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


class TrainFallback(BaseModel):
    """The answer when the job queue (Temporal) is down: the data is ready, train by hand."""

    success: bool = True
    message: str
    instructions: dict[str, str]
    note: str


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
    name: str = ""
    data: Any = None
    opts: Any = None
    detail: dict[str, Any] | None = None


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


class JobAction(BaseModel):
    success: bool = True
    message: str
    jobId: str
    status: str


class QueueAction(BaseModel):
    success: bool = True
    queue: str
    paused: bool
    message: str


class CleanBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace: int = Field(0, ge=0, description="only jobs finished more than this many ms ago")
    limit: int = Field(100, ge=0, le=1_000_000, description="always keep the newest `limit`")
    state: Literal["completed", "failed"] = "completed"


class Cleaned(BaseModel):
    success: bool = True
    queue: str
    state: str
    removed: list[str]


class ErrorOut(BaseModel):
    """Every refusal: `detail` says what is wrong and what to do (a list for body errors)."""

    detail: str | list[dict[str, Any]]
    success: bool | None = None
    message: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": description}
    for code, description in {
        400: "a malformed id or path (companyId, modelPath, version)",
        401: "missing, malformed, expired or wrongly signed token (WWW-Authenticate: Bearer)",
        403: "the token may not act for this company, or the route is admin-only",
        404: "no such job (or another tenant's)",
        409: "the job is not in a state that allows this",
        413: "request body or upload over a limit",
        422: "invalid body or unusable training data",
        429: "rate limit or tenant job quota reached (Retry-After)",
        503: "Temporal or Redis unreachable (Retry-After where known)",
    }.items()
}
