"""Every address, directory and limit, read once from the environment or `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TRAINING_QUEUE = "model-training"
DEPLOYMENT_QUEUE = "model-deployment"
QUEUES = (TRAINING_QUEUE, DEPLOYMENT_QUEUE)


def slots_queue(task_queue: str) -> str:
    """The task queue of `train_model` for workflows on `task_queue`: a training worker polls it
    only while it has a free training slot, so jobs beyond its capacity wait in Temporal."""
    return f"{task_queue}-slots"


TRAINING_SLOTS_QUEUE = slots_queue(TRAINING_QUEUE)
# Activity-only task queues a worker of a job queue also polls (readiness checks them too).
SLOT_QUEUES = {TRAINING_QUEUE: TRAINING_SLOTS_QUEUE}


class TenantLimits(BaseModel):
    """One tenant's own limits; a field left out keeps the global setting."""

    model_config = ConfigDict(extra="forbid")

    max_running_jobs: int | None = Field(default=None, ge=1)
    max_queued_jobs: int | None = Field(default=None, ge=1)
    rate_limit_per_minute: int | None = Field(default=None, ge=0)
    max_data_bytes: int | None = Field(default=None, ge=0)
    max_data_files: int | None = Field(default=None, ge=1)
    max_event_streams: int | None = Field(default=None, ge=1)
    # Set by an admin for the tenant's plan: Bull's priority of all its jobs (1 is the highest).
    priority: int | None = Field(default=None, ge=1, le=5)


class Settings(BaseSettings):
    """TenantTune configuration. Each field is also an environment variable (upper case)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Production unless development is asked for: development opens /docs and /metrics and
    # accepts a short JWT_SECRET (README "Security").
    environment: Literal["development", "production"] = "production"

    # Temporal
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_api_key: str | None = None
    temporal_tls: bool = False
    temporal_ui_port: int = 8233

    # Redis (the Bull-shaped status mirror)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "bull"
    redis_timeout_s: float = 1.0

    # Deployment: `local` = GGUF + Modelfile in the registry dir, served by llama.cpp;
    # `ollama` = uploaded to the Ollama server at OLLAMA_HOST.
    deploy_target: Literal["local", "ollama"] = "local"
    ollama_host: str = "http://127.0.0.1:11434"
    gguf_outtype: Literal["f16", "q8_0"] = "f16"
    ollama_quantize: str = ""
    deploy_max_attempts: int = 5
    deploy_retry_initial_s: float = 2.0
    # A deployment worker that dies mid-step is noticed after this long; the step is retried.
    deploy_heartbeat_timeout_s: int = Field(default=120, ge=15)
    convert_timeout_s: int = 3600
    verify_max_tokens: int = 32

    # Files
    state_dir: Path = Path(".tenanttune")
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")

    # Base model: empty means the tiny Mistral built locally under state_dir.
    base_model: str = ""

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    jwt_secret: str = Field(
        default="",
        description="HS256 signing secret, 32+ characters; no default: the API refuses to start "
        "without one (`tenanttune up` and `tenanttune token` use STATE_DIR/jwt-secret)",
    )
    jwt_ttl_s: int = 24 * 3600
    # Tokens (README "Security"): HS256 with JWT_SECRET, or RS256 verified with a PEM public
    # key or a JWKS file (keys picked by the token's `kid`). Only this one algorithm is accepted.
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_public_key_file: Path | None = None
    jwt_jwks_file: Path | None = None
    jwt_private_key_file: Path | None = Field(
        default=None, description="RS256 only: lets `tenanttune token` mint tokens (dev, tests)"
    )
    jwt_key_id: str = ""
    jwt_issuer: str = Field(default="", description="when set, tokens must carry this `iss`")
    jwt_audience: str = Field(default="", description="when set, tokens must carry this `aud`")
    # Hostile-caller limits (README "Security"), enforced before a request body is read.
    max_json_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="largest JSON request body (uploads: MAX_UPLOAD_BYTES)",
    )
    auth_failures_per_minute: int = Field(
        default=30,
        ge=0,
        description="failed authentications one client address may make per minute before "
        "every request from it gets 429; 0: no limit",
    )
    readyz_cache_s: float = Field(
        default=5.0, ge=0, description="seconds one readiness check answers /readyz for"
    )

    idempotency_secret: str = Field(
        default="",
        description="keys the job ids derived from Idempotency-Key (empty: JWT_SECRET); set it "
        "with RS256, where there is no shared secret",
    )

    @property
    def idempotency_key_secret(self) -> str:
        return self.idempotency_secret or self.jwt_secret

    # Dataset rules
    min_examples: int = Field(
        default=10, description="fewest usable examples a tenant needs to train"
    )
    max_example_chars: int = Field(
        default=4000, description="longer examples are dropped on export"
    )
    validation_share: float = Field(default=0.1, ge=0.0, lt=0.5)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_lines: int = Field(default=200_000, description="lines in one uploaded JSONL file")

    # Tenant limits (README "Security"). Each can be overridden per tenant with TENANT_LIMITS,
    # e.g. '{"acme": {"max_running_jobs": 4, "rate_limit_per_minute": 1200}}'.
    tenant_max_running_jobs: int = Field(default=3, ge=1, description="a tenant's active jobs")
    tenant_max_queued_jobs: int = Field(
        default=20, ge=1, description="a tenant's waiting, delayed and paused jobs"
    )
    metrics_token: str = Field(
        default="", description="bearer token the Prometheus scraper sends to the API's /metrics"
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="requests per tenant (all its tokens) per minute; 0: none"
    )
    tenant_max_data_bytes: int = Field(
        default=200 * 1024 * 1024, ge=0, description="a tenant's uploaded training data, in bytes"
    )
    tenant_max_data_files: int = Field(default=100, ge=1, description="a tenant's dataset files")
    tenant_max_event_streams: int = Field(
        default=8, ge=1, description="a tenant's open /events streams (SSE) at once"
    )
    event_stream_max_s: int = Field(
        default=3600, ge=10, description="an /events stream ends after this long; reconnect"
    )
    tenant_priority: int = Field(
        default=0, ge=0, le=5, description="Bull priority of a tenant's jobs (0: none); per plan"
    )
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict)
    quota_retry_after_s: int = Field(default=30, ge=1, description="Retry-After of a quota 429")

    # Training activity
    train_timeout_s: int = Field(
        default=6 * 3600, description="start-to-close timeout of one training try"
    )
    train_heartbeat_timeout_s: int = 60
    train_save_steps: int = 10
    train_max_seq_len: int = 256
    # Caps on one training job (README "Security"): refused before it runs, or stopped by the OS.
    train_max_token_budget: int = Field(
        default=20_000_000, description="epochs × dataset tokens (estimated) one job may train"
    )
    train_max_seq_len_limit: int = Field(default=2048, description="largest maxSeqLength allowed")
    train_max_memory_mb: int = Field(
        default=24_576, ge=0, description="address-space limit (RLIMIT_AS) of a training process"
    )
    train_max_wall_clock_s: int = Field(
        default=4 * 3600, ge=0, description="a training process is stopped after this long"
    )
    allowed_base_models: list[str] = Field(
        default_factory=list,
        description="base models a request may name (`baseModel`); BASE_MODEL is always allowed",
    )
    worker_max_concurrent_trainings: int = Field(
        default=1,
        ge=1,
        description="trainings one training worker runs at once (= its GPUs); more jobs wait "
        "in Temporal's task queue",
    )

    # Operations: traces, metrics, logs (see README "Operations")
    otel_exporter_otlp_endpoint: str = Field(
        default="", description="OTLP/HTTP collector base URL; empty: spans are not exported"
    )
    otel_service_name: str = ""
    worker_metrics_host: str = Field(
        default="127.0.0.1",
        description="address of a worker's metrics (they name tenants): keep it internal",
    )
    worker_metrics_port: int = Field(
        default=9464, description="Prometheus port of a worker process; 0: none"
    )
    metrics_max_tenants: int = Field(
        default=100, description="tenants with their own metrics label; the rest are `_other`"
    )
    log_format: Literal["text", "json"] = "text"

    def allows_base_model(self, name: str) -> bool:
        """BASE_MODEL (empty: the built-in tiny model) or one of ALLOWED_BASE_MODELS."""
        return name == self.base_model or name in self.allowed_base_models

    def limit(self, company_id: str, name: str) -> int:
        """A tenant's limit `name`: its TENANT_LIMITS override, else the global setting."""
        override = self.tenant_limits.get(company_id)
        value = getattr(override, name, None) if override else None
        if value is not None:
            return int(value)
        default = getattr(self, "tenant_" + name, None)
        return int(default if default is not None else getattr(self, name))

    @property
    def tiny_base_dir(self) -> Path:
        return self.state_dir / "base" / "tiny-mistral"

    @property
    def registry_dir(self) -> Path:
        return self.models_dir / "registry"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def tenant_data_dir(self, company_id: str) -> Path:
        return self.data_dir / "tenants" / company_id


@lru_cache
def get_settings() -> Settings:
    return Settings()
