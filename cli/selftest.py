"""`tenanttune selftest`: is the configured stack able to run a job? One check per part, each
with a hint when it fails, then a one-step training job end to end."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from jobs.service import JobService, TrainSubmission
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, SLOT_QUEUES, TRAINING_QUEUE, Settings
from tenanttune.temporal import SEARCH_ATTRIBUTES, connect, pollers
from tenanttune.types import TrainingHyperparameters

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
    """The job queues fully polled: workflows and activities, and the slot queue if it has one."""
    polled = set()
    # Each job queue, and the activity-only queue of its worker's slots (train_model).
    checked = [(q, q, True) for q in QUEUES] + [(s, q, False) for q, s in SLOT_QUEUES.items()]
    for name, queue, workflows in checked:
        try:
            found = await pollers(client, name)
        except Exception as exc:  # noqa: BLE001
            done(Check(f"workers on {name}", False, str(exc)))
            polled.discard(queue)
            continue
        ok = bool(found["activity"]) and (bool(found["workflow"]) or not workflows)
        if ok and workflows:
            polled.add(queue)
        elif not ok:
            polled.discard(queue)
        done(
            Check(
                f"workers on {name}",
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
    """A one-step training of the `selftest` tenant on a dozen sample examples, queued through
    the same front door as every API job."""
    lines = max(settings.min_examples + 4, 12)
    target = settings.tenant_data_dir(SELFTEST_TENANT)
    target.mkdir(parents=True, exist_ok=True)
    source = next(iter(sorted(EXAMPLES.glob("*.jsonl"))))
    with source.open() as fh:
        chosen = [line for _, line in zip(range(lines), fh, strict=False)]
    (target / "selftest.jsonl").write_text("".join(chosen))
    jobs = JobService(
        settings,
        JobMirror.from_url(settings.redis_url, settings.redis_prefix, settings.redis_timeout_s),
        lambda: _ready(client),
    )
    # One batch holds every example: exactly one optimizer step.
    submission = TrainSubmission(
        hyperparameters=TrainingHyperparameters(epochs=1, batch_size=lines)
    )
    started = time.monotonic()
    job_id = "(not queued)"
    try:
        job_id = (await jobs.train(SELFTEST_TENANT, submission)).job_id
        info = await jobs.wait(job_id, timeout_s)
    except Exception as exc:  # noqa: BLE001
        return Check("training job", False, f"{job_id}: {exc}", _show_hint(job_id))
    finally:
        await jobs.mirror.close()
    if info.state != "completed":
        if info.state not in ("failed",):
            with contextlib.suppress(Exception):
                await jobs.cancel(job_id)
        return Check(
            "training job",
            False,
            f"{job_id}: {info.state} after {time.monotonic() - started:.0f} s "
            f"{info.failedReason or ''}".rstrip(),
            _show_hint(job_id),
        )
    metrics = (info.result or {}).get("metrics", {})
    steps, loss = metrics.get("steps"), metrics.get("trainLoss")
    loss_text = f"{loss:.3f}" if isinstance(loss, float) else str(loss)
    return Check(
        "training job",
        steps == 1,
        f"{job_id}: {steps} step, loss {loss_text}, {time.monotonic() - started:.1f} s, "
        f"model at {(info.result or {}).get('modelPath')}",
        "" if steps == 1 else "expected exactly one training step",
    )


async def _ready(client: Client) -> Client:
    return client


def _show_hint(job_id: str) -> str:
    return f"see `temporal workflow show --workflow-id {job_id}` and the worker's log"


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
