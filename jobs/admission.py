"""Admission: whether a job may be queued at all — the tenant's data, the server's training caps,
the base model allow-list and the tenant's job quotas. Every refusal is a JobError whose message
says what to fix; nothing is started or written before all checks pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from jobs.errors import InvalidJob, QuotaExceeded, SubmissionBusy
from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, Settings
from training import dataset, tokens
from training.spec import TrainingHyperparameters

_ANALYSES: OrderedDict[tuple[Any, ...], tuple[dataset.DatasetReport, list[dataset.Example]]]
_ANALYSES = OrderedDict()
_ANALYSES_KEPT = 4
_analyses_lock = threading.Lock()


def analyze_tenant(
    settings: Settings, company_id: str
) -> tuple[dataset.DatasetReport, list[dataset.Example]]:
    """The analysis of the tenant's files as they are now, computed once per change of its files
    (name, size, mtime), so repeated submissions or refusals cost no re-reading. Blocking: call
    it in a thread. The result is shared: read it, never change it."""
    files = dataset.tenant_files(settings.tenant_data_dir(company_id))
    signature = []
    for f in files:
        st = f.stat()
        signature.append((f.name, st.st_size, st.st_mtime_ns))
    key = (company_id, settings.max_example_chars, tuple(signature))
    with _analyses_lock:
        if key in _ANALYSES:
            _ANALYSES.move_to_end(key)
            return _ANALYSES[key]
    found = dataset.analyze(files, settings.max_example_chars)
    with _analyses_lock:
        _ANALYSES[key] = found
        while len(_ANALYSES) > _ANALYSES_KEPT:
            _ANALYSES.popitem(last=False)
    return found


def stored_data(settings: Settings, company_id: str, replacing: str = "") -> tuple[int, int]:
    """(bytes, files) of the tenant's stored data, not counting the file `replacing`."""
    files = [
        f for f in dataset.tenant_files(settings.tenant_data_dir(company_id)) if f.name != replacing
    ]
    return sum(f.stat().st_size for f in files), len(files)


async def usable_training_data(
    settings: Settings, company_id: str
) -> tuple[dataset.DatasetReport, list[dataset.Example]]:
    """The tenant's uploaded examples, refused when there are none or too few usable ones."""
    files = dataset.tenant_files(settings.tenant_data_dir(company_id))
    if not files:
        raise InvalidJob(
            f"company '{company_id}' has no training data: upload a JSONL file with "
            f"POST /api/ai/datasets/{company_id}"
        )
    report, examples = await asyncio.to_thread(analyze_tenant, settings, company_id)
    problem = report.problem()
    if not problem and report.usable < settings.min_examples:
        problem = f"only {report.usable} usable examples; at least {settings.min_examples} needed"
    if problem:
        raise InvalidJob(f"training data of company '{company_id}' is not usable: {problem}")
    return report, examples


def allowed_base(settings: Settings, requested: str | None) -> str:
    """The base model to train on: BASE_MODEL, or one named from ALLOWED_BASE_MODELS."""
    if requested is None:
        return settings.base_model
    if not settings.allows_base_model(requested):
        allowed = [settings.base_model or "(the built-in tiny model)"]
        allowed += settings.allowed_base_models
        raise InvalidJob(
            f"baseModel {requested!r} is not allowed on this server; allowed: {allowed} "
            "(ALLOWED_BASE_MODELS)"
        )
    return requested


async def check_training_caps(
    settings: Settings,
    hp: TrainingHyperparameters,
    examples: list[dataset.Example],
    base_model: str,
) -> tokens.TokenCount:
    """Refuse, before anything runs, a job over the server's sequence or token budget.

    Tokens are counted with the base model's tokenizer (an upper bound where it is not on this
    host); the worker counts again when it exports the data, so data uploaded after this check
    cannot slip past it.
    """
    problems = hp.problems()
    if problems:
        raise InvalidJob("; ".join(problems))
    if hp.max_seq_len > settings.train_max_seq_len_limit:
        raise InvalidJob(
            f"maxSeqLength {hp.max_seq_len} is over this server's limit of "
            f"{settings.train_max_seq_len_limit} (TRAIN_MAX_SEQ_LEN_LIMIT)"
        )
    counted = await asyncio.to_thread(
        tokens.count,
        base_model or settings.tiny_base_dir,
        [e.messages for e in examples],
        hp.max_seq_len,
    )
    problem = token_budget_problem(settings, hp, counted)
    if problem:
        raise InvalidJob(problem)
    return counted


def token_budget_problem(
    settings: Settings, hp: TrainingHyperparameters, counted: tokens.TokenCount
) -> str:
    """Why `counted` x epochs is over TRAIN_MAX_TOKEN_BUDGET ("" when it is not)."""
    total = counted.tokens * hp.epochs
    if total <= settings.train_max_token_budget:
        return ""
    how = "" if counted.exact else "up to "
    return (
        f"this job would train {how}{total:,} tokens ({hp.epochs} epochs x {how}"
        f"{counted.tokens:,} tokens of data), over the budget of "
        f"{settings.train_max_token_budget:,} (TRAIN_MAX_TOKEN_BUDGET); lower epochs or "
        "maxSeqLength, or train on less data"
    )


async def check_job_quota(
    settings: Settings, mirror: JobMirror, client: Client, company_id: str
) -> None:
    """QuotaExceeded when the tenant already has as many unfinished jobs as its limits allow.

    Counted from the mirror; with Redis down, from Temporal's visibility (all unfinished jobs
    against the sum of both limits).
    """
    max_running = settings.limit(company_id, "max_running_jobs")
    max_queued = settings.limit(company_id, "max_queued_jobs")
    retry_after = settings.quota_retry_after_s
    try:
        running, queued = await mirror.tenant_load(list(QUEUES), company_id)
        if running >= max_running or queued >= max_queued:
            # About to refuse: first forget jobs Temporal has closed but the mirror never heard
            # of (terminated, timed out, or finished while Redis was down), so a stale entry can
            # never lock a tenant out.
            if await _forget_closed(mirror, client, company_id):
                running, queued = await mirror.tenant_load(list(QUEUES), company_id)
    except (RedisError, OSError):
        unfinished = (
            await client.count_workflows(
                f"CompanyId = '{company_id}' AND ExecutionStatus = 'Running'"
            )
        ).count
        if unfinished >= max_running + max_queued:
            raise QuotaExceeded(
                f"company '{company_id}' has {unfinished} unfinished jobs, its limit is "
                f"{max_running + max_queued} (TENANT_MAX_RUNNING_JOBS + TENANT_MAX_QUEUED_JOBS); "
                "wait for one to finish",
                retry_after,
            ) from None
        return
    if running >= max_running:
        raise QuotaExceeded(
            f"company '{company_id}' has {running} jobs running, its limit is {max_running} "
            "(TENANT_MAX_RUNNING_JOBS); wait for one to finish",
            retry_after,
        )
    if queued >= max_queued:
        raise QuotaExceeded(
            f"company '{company_id}' has {queued} jobs waiting, its limit is {max_queued} "
            "(TENANT_MAX_QUEUED_JOBS); wait for some to start",
            retry_after,
        )


async def _forget_closed(mirror: JobMirror, client: Client, company_id: str) -> int:
    forgotten = 0
    for queue in QUEUES:
        for job_id in await mirror.open_jobs(queue, company_id):
            try:
                desc = await client.get_workflow_handle(job_id).describe()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                closed = True
            else:
                closed = desc.status != WorkflowExecutionStatus.RUNNING
            if closed:
                await mirror.forget_open(queue, company_id, job_id)
                forgotten += 1
    return forgotten


@contextlib.asynccontextmanager
async def tenant_lock(mirror: JobMirror, company_id: str) -> AsyncIterator[None]:
    """Serialise one tenant's quota check + the job's move into the mirror, across API
    processes (a Redis lock that expires by itself), so concurrent submissions or retries
    cannot slip past the quota together. Without Redis there is nothing to lock."""
    key = mirror.key("quota", f"lock:{company_id}")
    token = uuid.uuid4().hex
    held = False
    try:
        deadline = time.monotonic() + 10
        while not (held := bool(await mirror.redis.set(key, token, nx=True, px=10_000))):
            if time.monotonic() > deadline:
                raise SubmissionBusy(
                    f"too many simultaneous submissions for company '{company_id}'; retry", 1
                )
            await asyncio.sleep(0.01)
    except (RedisError, OSError):
        held = False
    try:
        yield
    finally:
        if held:
            with contextlib.suppress(RedisError, OSError):
                await mirror.redis.eval(_UNLOCK, 1, key, token)


_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
