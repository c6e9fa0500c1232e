"""`tenanttune selftest`: is the configured stack able to run a job? One check per part, each
with a hint when it fails, then a one-step training job end to end."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from tenanttune.jobs import new_job_id
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, TRAINING_QUEUE, Settings
from tenanttune.temporal import SEARCH_ATTRIBUTES, connect, job_start_metadata, pollers
from tenanttune.types import TrainingHyperparameters, TrainRequest

SELFTEST_TENANT = "selftest"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tenants" / "acme"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    hint: str = ""


async def run_selftest(
    settings: Settings, report: Callable[[Check], None], train: bool = True, timeout_s: float = 600
) -> list[Check]:
    """Run every check, handing each to `report` as it finishes; return them all."""
    checks: list[Check] = []

    def done(check: Check) -> Check:
        checks.append(check)
        report(check)
        return check

    client = await _temporal(settings, done)
    await _redis(settings, done)
    polled = await _pollers(client, done) if client else set()
    done(_models_dir(settings))
    if train:
        if client is None or TRAINING_QUEUE not in polled:
            done(
                Check(
                    "training job",
                    False,
                    "not run: needs Temporal and a worker on model-training",
                    "fix the checks above first",
                )
            )
        else:
            done(await _training_job(client, settings, timeout_s))
    return checks


async def _temporal(settings: Settings, done: Callable[[Check], Check]) -> Client | None:
    address = settings.temporal_address
    try:
        client = await asyncio.wait_for(connect(settings), 10)
        info = await client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=5)
        )
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        done(
            Check(
                "temporal",
                False,
                f"{address}: {exc}",
                "start it with `tenanttune up`, or set TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE",
            )
        )
        return None
    done(Check("temporal", True, f"{address}, server {info.server_version}"))
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=settings.temporal_namespace),
            timeout=timedelta(seconds=5),
        )
        missing = [k.name for k in SEARCH_ATTRIBUTES if k.name not in listed.custom_attributes]
    except Exception as exc:  # noqa: BLE001
        missing = [f"(cannot list: {exc})"]
    done(
        Check(
            "search attributes",
            not missing,
            "missing: " + ", ".join(missing)
            if missing
            else ", ".join(k.name for k in SEARCH_ATTRIBUTES),
            "create them: temporal operator search-attribute create --name <Name> --type Keyword"
            if missing
            else "",
        )
    )
    return client


async def _redis(settings: Settings, done: Callable[[Check], Check]) -> None:
    mirror = JobMirror.from_url(settings.redis_url, settings.redis_prefix, 2.0)
    try:
        await mirror.ping()
        done(Check("redis", True, _redacted(settings.redis_url)))
    except Exception as exc:  # noqa: BLE001
        done(
            Check(
                "redis",
                False,
                f"{_redacted(settings.redis_url)}: {exc}",
                "check REDIS_URL and that redis-server runs (jobs still run; status is slower)",
            )
        )
    finally:
        await mirror.close()


async def _pollers(client: Client, done: Callable[[Check], Check]) -> set[str]:
    polled = set()
    for queue in QUEUES:
        try:
            found = await pollers(client, queue)
        except Exception as exc:  # noqa: BLE001
            done(Check(f"workers on {queue}", False, str(exc)))
            continue
        ok = bool(found["workflow"]) and bool(found["activity"])
        if ok:
            polled.add(queue)
        done(
            Check(
                f"workers on {queue}",
                ok,
                ", ".join(found["activity"]) if ok else "no worker is polling this queue",
                "" if ok else f"start one: python worker.py --queues {queue}",
            )
        )
    return polled


def _models_dir(settings: Settings) -> Check:
    path = settings.models_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".selftest-"):
            pass
    except OSError as exc:
        return Check(
            "models dir",
            False,
            f"{path}: {exc}",
            "set MODELS_DIR to a writable directory (shared by every worker host)",
        )
    return Check("models dir", True, str(path.resolve()))


async def _training_job(client: Client, settings: Settings, timeout_s: float) -> Check:
    """A one-step training of the `selftest` tenant on a dozen sample examples."""
    lines = max(settings.min_examples + 4, 12)
    target = settings.tenant_data_dir(SELFTEST_TENANT)
    target.mkdir(parents=True, exist_ok=True)
    source = next(iter(sorted(EXAMPLES.glob("*.jsonl"))))
    with source.open() as fh:
        chosen = [line for _, line in zip(range(lines), fh, strict=False)]
    (target / "selftest.jsonl").write_text("".join(chosen))
    job_id = new_job_id(TRAINING_QUEUE, SELFTEST_TENANT)
    req = TrainRequest(
        job_id=job_id,
        company_id=SELFTEST_TENANT,
        # One batch holds every example: exactly one optimizer step.
        hyperparameters=TrainingHyperparameters(epochs=1, batch_size=lines),
        base_model=settings.base_model,
        train_timeout_s=int(timeout_s),
        heartbeat_timeout_s=settings.train_heartbeat_timeout_s,
        save_steps=settings.train_save_steps,
    )
    from workflows.training import TrainingWorkflow

    started = time.monotonic()
    try:
        handle = await client.start_workflow(
            TrainingWorkflow.run,
            req,
            id=job_id,
            task_queue=TRAINING_QUEUE,
            execution_timeout=timedelta(seconds=timeout_s),
            **job_start_metadata(req),
        )
        result = await asyncio.wait_for(handle.result(), timeout_s)
    except Exception as exc:  # noqa: BLE001
        return Check(
            "training job",
            False,
            f"{job_id}: {getattr(exc, 'cause', None) or exc}",
            f"see `temporal workflow show --workflow-id {job_id}` and the worker's log",
        )
    steps = result.metrics.get("steps")
    loss = result.metrics.get("train_loss")
    loss_text = f"{loss:.3f}" if isinstance(loss, float) else str(loss)
    return Check(
        "training job",
        steps == 1,
        f"{job_id}: {steps} step, loss {loss_text}, {time.monotonic() - started:.1f} s, "
        f"model at {result.model_path}",
        "" if steps == 1 else "expected exactly one training step",
    )


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
