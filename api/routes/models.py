"""Model jobs of one tenant: train and deploy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, status
from redis.exceptions import RedisError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from api.deps import CurrentTenant, MirrorDep, SettingsDep, get_temporal
from api.model_paths import ModelPathError, resolve_model_path
from api.schemas import DeployAccepted, DeployBody, TrainAccepted, TrainBody
from tenanttune.jobs import JOB_KIND, model_name, new_job_id, valid_tag
from tenanttune.mirror import JobMirror
from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, Settings
from tenanttune.temporal import job_search_attributes
from tenanttune.types import DeployRequest, TrainingHyperparameters, TrainRequest
from training import dataset
from training.base_model import short_name
from workflows.deployment import DeploymentWorkflow
from workflows.training import TrainingWorkflow

router = APIRouter(prefix="/api/ai/models", tags=["models"])
IdempotencyKey = Annotated[str | None, Header(max_length=200)]


async def _queue(
    request: Request,
    mirror: JobMirror,
    queue: str,
    job_id: str,
    company_id: str,
    name: str,
    data: dict[str, Any],
    workflow_run: Any,
    arg: Any,
) -> None:
    """Mirror the job as waiting and start its workflow (the same id never runs twice)."""
    client = await get_temporal(request)
    try:
        await mirror.add(queue, job_id, name=name, company_id=company_id, data=data)
    except (RedisError, OSError):
        pass  # the mirror is a cache; Temporal answers status queries without it
    try:
        await client.start_workflow(
            workflow_run,
            arg,
            id=job_id,
            task_queue=queue,
            search_attributes=job_search_attributes(company_id, JOB_KIND[queue]),
            # The same Idempotency-Key maps to the same id: return the existing run.
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except RPCError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"could not queue the job: {exc.message}"
        ) from exc


@router.post("/{company_id}/train", status_code=status.HTTP_202_ACCEPTED)
async def train(
    company_id: CurrentTenant,
    body: TrainBody,
    settings: SettingsDep,
    mirror: MirrorDep,
    request: Request,
    idempotency_key: IdempotencyKey = None,
) -> TrainAccepted:
    """Validate the tenant's data and queue a LoRA fine-tuning job."""
    files = dataset.tenant_files(settings.tenant_data_dir(company_id))
    if not files:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"company '{company_id}' has no training data: upload a JSONL file with "
            f"POST /api/ai/datasets/{company_id}",
        )
    report, _ = await asyncio.to_thread(dataset.analyze, files, settings.max_example_chars)
    problem = report.problem()
    if not problem and report.usable < settings.min_examples:
        problem = f"only {report.usable} usable examples; at least {settings.min_examples} needed"
    if problem:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"training data of company '{company_id}' is not usable: {problem}",
        )
    job_id = new_job_id(TRAINING_QUEUE, company_id, idempotency_key)
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
        base_model=settings.base_model,
        version=body.version or "",
        train_timeout_s=settings.train_timeout_s,
        heartbeat_timeout_s=settings.train_heartbeat_timeout_s,
        save_steps=settings.train_save_steps,
        auto_deploy=body.autoDeploy,
        deploy_version=body.deployVersion or "",
        deploy_target=settings.deploy_target,
    )
    await _queue(
        request,
        mirror,
        TRAINING_QUEUE,
        job_id,
        company_id,
        "train",
        body.model_dump(exclude_none=True),
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
    job_id = new_job_id(DEPLOYMENT_QUEUE, company_id, idempotency_key)
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
        max_attempts=settings.deploy_max_attempts,
        retry_initial_s=settings.deploy_retry_initial_s,
    )
    await _queue(
        request,
        mirror,
        DEPLOYMENT_QUEUE,
        job_id,
        company_id,
        "deploy",
        body.model_dump(exclude_none=True),
        DeploymentWorkflow.run,
        deploy_request,
    )
    return DeployAccepted(message="Deployment job queued", jobId=job_id, modelName=name)


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
