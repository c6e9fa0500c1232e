"""Every address, directory and limit, read once from the environment or `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TRAINING_QUEUE = "model-training"
DEPLOYMENT_QUEUE = "model-deployment"
QUEUES = (TRAINING_QUEUE, DEPLOYMENT_QUEUE)

# Used only when ENVIRONMENT=development; the API refuses to sign or accept it elsewhere.
DEV_JWT_SECRET = "tenanttune-dev-secret-change-me-0123456789"


class Settings(BaseSettings):
    """TenantTune configuration. Each field is also an environment variable (upper case)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = "development"

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
    jwt_secret: str = DEV_JWT_SECRET
    jwt_ttl_s: int = 24 * 3600

    # Dataset rules
    min_examples: int = Field(
        default=10, description="fewest usable examples a tenant needs to train"
    )
    max_example_chars: int = Field(
        default=4000, description="longer examples are dropped on export"
    )
    validation_share: float = Field(default=0.1, ge=0.0, lt=0.5)
    max_upload_bytes: int = 20 * 1024 * 1024

    # Training activity
    train_timeout_s: int = Field(
        default=6 * 3600, description="start-to-close timeout of one training try"
    )
    train_heartbeat_timeout_s: int = 60
    train_save_steps: int = 10
    train_max_seq_len: int = 256
    worker_max_concurrent_trainings: int = 1

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
