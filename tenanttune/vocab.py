"""Job ids, queues and Bull's job states: the vocabulary shared by the API, workflows and mirror."""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from enum import StrEnum

from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE

# Whole-string patterns: always `fullmatch` (with `match`, `$` also matches before a trailing
# newline, so "acme\n" would pass). api/schemas.py anchors them for pydantic's `pattern=`.
COMPANY_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
JOB_ID_RE = re.compile(r"(train|deploy)-[a-z0-9][a-z0-9_-]{0,62}-[0-9a-f]{12,32}")
_PREFIX_TO_QUEUE = {"train": TRAINING_QUEUE, "deploy": DEPLOYMENT_QUEUE}
_QUEUE_TO_PREFIX = {v: k for k, v in _PREFIX_TO_QUEUE.items()}
JOB_KIND = {TRAINING_QUEUE: "training", DEPLOYMENT_QUEUE: "deployment"}


class JobState(StrEnum):
    WAITING = "waiting"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    DELAYED = "delayed"
    PAUSED = "paused"


# Ollama's tag rule: a letter, digit or underscore, then up to 127 of those, '.' or '-'.
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def valid_tag(version: str) -> bool:
    return TAG_RE.fullmatch(version) is not None


def model_name(base_short_name: str, company_id: str, version: str) -> str:
    """The served model's name: `mistral-7b-company-tenant-123:1.0`."""
    return f"{base_short_name}-company-{company_id}:{version}"


PAUSED_QUERY = "paused"  # QueueControlWorkflow's query: is the queue paused?


def control_workflow_id(queue: str) -> str:
    """The id of the workflow that holds a queue's paused/resumed switch."""
    return f"queue-control-{queue}"


# Directories under MODELS_DIR that are not tenants.
RESERVED_COMPANY_IDS = frozenset({"registry"})


def valid_company_id(company_id: str) -> bool:
    return (
        COMPANY_ID_RE.fullmatch(company_id) is not None and company_id not in RESERVED_COMPANY_IDS
    )


def new_job_id(queue: str, company_id: str, key: str | None = None, secret: str = "") -> str:
    """A job id that names its queue and tenant; the same idempotency key gives the same id.

    With a key, the suffix is an HMAC of tenant and key under the server's secret, so nobody
    can compute another tenant's job id from a key they guess.
    """
    if key:
        digest = hmac.new(secret.encode(), f"{company_id}/{key}".encode(), hashlib.sha256)
        suffix = digest.hexdigest()
    else:
        suffix = uuid.uuid4().hex
    return f"{_QUEUE_TO_PREFIX[queue]}-{company_id}-{suffix[:16]}"


def company_of(job_id: str) -> str | None:
    """The tenant a job id names (None for a string that is not one of our job ids)."""
    if queue_of(job_id) is None:
        return None
    return job_id.split("-", 1)[1].rsplit("-", 1)[0]


def queue_of(job_id: str) -> str | None:
    """The queue a job id belongs to, or None for a string that is not one of our job ids."""
    if JOB_ID_RE.fullmatch(job_id) is None:
        return None
    return _PREFIX_TO_QUEUE[job_id.split("-", 1)[0]]
