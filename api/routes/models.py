"""Model jobs of one tenant: train and deploy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.deps import (
    CurrentTenant,
    MirrorDep,
    SettingsDep,
    TemporalConnector,
    TemporalUnavailable,
    get_temporal,
)
from api.limits import check_job_quota, tenant_submission_lock
from api.model_paths import ModelPathError, resolve_model_path
from api.schemas import (
    DeployAccepted,
    DeployBody,
    JobOptionsBody,
    TrainAccepted,
    TrainBody,
    TrainFallback,
)
from tenanttune.jobs import model_name, new_job_id, valid_tag
from tenanttune.mirror import JobMirror
from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, Settings
from tenanttune.temporal import job_start_metadata
from tenanttune.types import DeployRequest, JobOptions, TrainingHyperparameters, TrainRequest
from training import dataset
from training.base_model import short_name
from workflows.deployment import DeploymentWorkflow
from workflows.training import TrainingWorkflow

router = APIRouter(prefix="/api/ai/models", tags=["models"])
OPTION_FIELDS = set(JobOptionsBody.model_fields)
IdempotencyKey = Annotated[str | None, Header(max_length=200)]


async def _queue(
    request: Request,
    mirror: JobMirror,
    queue: str,
    job_id: str,
    company_id: str,
    name: str,
    body: JobOptionsBody,
    workflow_run: Any,
    arg: TrainRequest | DeployRequest,
) -> None:
    """Mirror the job as waiting (or delayed) and start its workflow.

    One job id never runs twice: a running job is returned as it is (conflict policy), and a
    finished one is not started again (reuse policy) — retry has its own route.
    """
    client = await get_temporal(request)
    options = arg.options
    added = False
    async with tenant_submission_lock(mirror, company_id):
        existing = None
        with contextlib.suppress(RedisError, OSError):
            existing = await mirror.state_of(queue, job_id)
        if existing is None:  # the same Idempotency-Key again is an answer, not a new job
            await check_job_quota(request.app.state.settings, mirror, client, company_id)
        try:
            added = await mirror.add(
                queue,
                job_id,
                name=name,
                company_id=company_id,
                data=body.model_dump(exclude_none=True, exclude=OPTION_FIELDS),
                opts=body.model_dump(exclude_none=True, include=OPTION_FIELDS),
                delay_ms=options.delay_ms,
                priority=options.priority,
            )
        except (RedisError, OSError):
            pass  # the mirror is a cache; Temporal answers status queries without it
    try:
        await client.start_workflow(
            workflow_run,
            arg,
            id=job_id,
            task_queue=queue,
            **job_start_metadata(arg),  # search attributes, Web UI summary
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            memo={"attemptsBefore": options.attempts_before},
            start_delay=timedelta(milliseconds=options.delay_ms) if options.delay_ms else None,
            priority=Priority(priority_key=options.priority) if options.priority else Priority(),
        )
    except WorkflowAlreadyStartedError:
        # The same key after the job finished: the answer is that job. An entry just added
        # for it would claim it is waiting; Temporal answers for it instead.
        if added:
            with contextlib.suppress(RedisError, OSError):
                await mirror.remove(queue, job_id)
    except RPCError as exc:
        if added:
            with contextlib.suppress(RedisError, OSError):
                await mirror.remove(queue, job_id)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"could not queue the job: {exc.message}"
        ) from exc


CHARS_PER_TOKEN = 4  # a common estimate for English text with a BPE/SentencePiece tokenizer


def _allowed_base(body: TrainBody, settings: Settings) -> str:
    """The base model to train on: BASE_MODEL, or one named from ALLOWED_BASE_MODELS."""
    if body.baseModel is None:
        return settings.base_model
    if not settings.allows_base_model(body.baseModel):
        allowed = [settings.base_model or "(the built-in tiny model)"]
        allowed += settings.allowed_base_models
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"baseModel {body.baseModel!r} is not allowed on this server; allowed: {allowed} "
            "(ALLOWED_BASE_MODELS)",
        )
    return body.baseModel


def _check_training_caps(
    body: TrainBody, examples: list[dataset.Example], settings: Settings
) -> None:
    """Refuse, before anything runs, a job over the server's sequence or token budget."""
    if body.maxSeqLength > settings.train_max_seq_len_limit:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"maxSeqLength {body.maxSeqLength} is over this server's limit of "
            f"{settings.train_max_seq_len_limit} (TRAIN_MAX_SEQ_LEN_LIMIT)",
        )
    per_epoch = sum(min(e.chars // CHARS_PER_TOKEN + 1, body.maxSeqLength) for e in examples)
    total = per_epoch * body.epochs
    if total > settings.train_max_token_budget:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"this job would train about {total:,} tokens ({body.epochs} epochs x ~{per_epoch:,} "
            f"tokens of data), over the budget of {settings.train_max_token_budget:,} "
            "(TRAIN_MAX_TOKEN_BUDGET); lower epochs or maxSeqLength",
        )


def _idempotency(body: JobOptionsBody, header: str | None) -> str | None:
    return header or body.jobId


@router.post(
    "/{company_id}/train",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainAccepted,
    responses={200: {"model": TrainFallback, "description": "job queue down: run it by hand"}},
)
async def train(
    company_id: CurrentTenant,
    body: TrainBody,
    settings: SettingsDep,
    mirror: MirrorDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> TrainAccepted | JSONResponse:
    """Validate the tenant's data and queue a LoRA fine-tuning job."""
    files = dataset.tenant_files(settings.tenant_data_dir(company_id))
    if not files:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"company '{company_id}' has no training data: upload a JSONL file with "
            f"POST /api/ai/datasets/{company_id}",
        )
    report, examples = await asyncio.to_thread(dataset.analyze, files, settings.max_example_chars)
    problem = report.problem()
    if not problem and report.usable < settings.min_examples:
        problem = f"only {report.usable} usable examples; at least {settings.min_examples} needed"
    if problem:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"training data of company '{company_id}' is not usable: {problem}",
        )
    base_model = _allowed_base(body, settings)
    _check_training_caps(body, examples, settings)
    connector: TemporalConnector = request.app.state.temporal
    try:
        await connector.get()
    except TemporalUnavailable:
        return await _manual_fallback(company_id, body, settings)
    job_id = new_job_id(TRAINING_QUEUE, company_id, _idempotency(body, idempotency_key))
    hp = TrainingHyperparameters(
        epochs=body.epochs,
        batch_size=body.batchSize,
        learning_rate=body.learningRate,
        lora_r=body.loraRank,
        lora_alpha=body.loraAlpha,
        lora_dropout=body.loraDropout,
        target_modules=body.targetModules,
        max_seq_len=body.maxSeqLength,
        grad_accum=body.gradientAccumulation,
        seed=body.seed,
    )
    train_request = TrainRequest(
        job_id=job_id,
        company_id=company_id,
        hyperparameters=hp,
        base_model=base_model,
        version=body.version or "",
        train_timeout_s=settings.train_timeout_s,
        heartbeat_timeout_s=settings.train_heartbeat_timeout_s,
        save_steps=settings.train_save_steps,
        auto_deploy=body.autoDeploy,
        deploy_version=body.deployVersion or "",
        deploy_target=settings.deploy_target,
        options=body.job_options(default_attempts=2, default_backoff_ms=5000),
        deploy_outtype=settings.gguf_outtype,
        deploy_quantize=settings.ollama_quantize,
        deploy_options=JobOptions(
            attempts=settings.deploy_max_attempts,
            backoff_delay_ms=int(settings.deploy_retry_initial_s * 1000),
        ),
        deploy_heartbeat_timeout_s=settings.deploy_heartbeat_timeout_s,
    )
    await _queue(
        request,
        mirror,
        TRAINING_QUEUE,
        job_id,
        company_id,
        "train",
        body,
        TrainingWorkflow.run,
        train_request,
    )
    return TrainAccepted(
        message="Training job queued",
        jobId=job_id,
        datasetSize=report.usable,
        qualityScore=report.quality_score,
    )


@router.post(
    "/{company_id}/deploy",
    status_code=status.HTTP_202_ACCEPTED,
    responses={400: {"description": "modelPath or version not allowed; nothing queued"}},
)
async def deploy(
    company_id: CurrentTenant,
    body: DeployBody,
    settings: SettingsDep,
    mirror: MirrorDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> DeployAccepted:
    """Queue a job that converts a trained model to GGUF, publishes it and checks it answers."""
    if not valid_tag(body.version):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "version must be a valid model tag: 1-128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'",
        )
    try:
        path = resolve_model_path(body.modelPath, settings.models_dir, company_id)
    except ModelPathError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    name = model_name(_base_short_name(path, settings), company_id, body.version)
    job_id = new_job_id(DEPLOYMENT_QUEUE, company_id, _idempotency(body, idempotency_key))
    deploy_request = DeployRequest(
        job_id=job_id,
        company_id=company_id,
        model_path=str(path),
        version=body.version,
        model_name=name,
        target=settings.deploy_target,
        outtype=body.outtype or settings.gguf_outtype,
        quantize=body.quantize or settings.ollama_quantize,
        source_job=_source_job(path),
        options=body.job_options(
            default_attempts=settings.deploy_max_attempts,
            default_backoff_ms=int(settings.deploy_retry_initial_s * 1000),
        ),
        heartbeat_timeout_s=settings.deploy_heartbeat_timeout_s,
    )
    await _queue(
        request,
        mirror,
        DEPLOYMENT_QUEUE,
        job_id,
        company_id,
        "deploy",
        body,
        DeploymentWorkflow.run,
        deploy_request,
    )
    return DeployAccepted(message="Deployment job queued", jobId=job_id, modelName=name)


async def _manual_fallback(company_id: str, body: TrainBody, settings: Settings) -> JSONResponse:
    """Temporal is unreachable: prepare the data, say how to train by hand (the seed's answer)."""
    train_file = settings.data_dir / f"{company_id}-training.jsonl"
    eval_file = settings.data_dir / f"{company_id}-validation.jsonl"
    await asyncio.to_thread(
        dataset.export,
        settings.tenant_data_dir(company_id),
        [(train_file, eval_file)],
        max_example_chars=settings.max_example_chars,
        validation_share=settings.validation_share,
        min_examples=settings.min_examples,
    )
    base = settings.base_model or str(settings.tiny_base_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    train = [
        "python",
        "-m",
        "training.train",
        "--base-model",
        base,
        "--train-file",
        str(train_file),
        "--eval-file",
        str(eval_file),
        "--output-dir",
        str(settings.models_dir / company_id / f"manual-{stamp}"),
        "--epochs",
        str(body.epochs),
        "--batch-size",
        str(body.batchSize),
        "--learning-rate",
        str(body.learningRate),
        "--lora-r",
        str(body.loraRank),
        "--lora-alpha",
        str(body.loraAlpha),
        "--lora-dropout",
        str(body.loraDropout),
        "--target-modules",
        ",".join(body.targetModules),
        "--max-seq-len",
        str(body.maxSeqLength),
        "--grad-accum",
        str(body.gradientAccumulation),
        "--seed",
        str(body.seed),
        "--save-steps",
        str(settings.train_save_steps),
    ]
    command = shlex.join(train)
    if not settings.base_model:
        command = f"python -m training.base_model {shlex.quote(base)} && {command}"
    answer = TrainFallback(
        message="Training data prepared. Run fine-tuning service manually:",
        instructions={"command": command, "dataPath": str(train_file)},
        note="Job queue unavailable. Use manual command above.",
    )
    return JSONResponse(status_code=200, content=answer.model_dump())


def _manifest(path: Path) -> dict[str, Any]:
    manifest = (path if path.is_dir() else path.parent) / "manifest.json"
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return data


def _base_short_name(path: Path, settings: Settings) -> str:
    base = _manifest(path).get("base_model")
    if base:
        return short_name(str(base))
    if settings.base_model:
        return short_name(settings.base_model)
    return short_name(str(settings.tiny_base_dir))


def _source_job(path: Path) -> str:
    return str(_manifest(path).get("job_id", ""))
