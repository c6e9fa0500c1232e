"""Model jobs of one tenant: train (and, later, deploy)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, status
from redis.exceptions import RedisError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from api.deps import CurrentTenant, MirrorDep, SettingsDep, get_temporal
from api.schemas import TrainAccepted, TrainBody
from tenanttune.jobs import JOB_KIND, new_job_id
from tenanttune.settings import TRAINING_QUEUE
from tenanttune.temporal import job_search_attributes
from tenanttune.types import TrainingHyperparameters, TrainRequest
from training import dataset
from workflows.training import TrainingWorkflow

router = APIRouter(prefix="/api/ai/models", tags=["models"])


@router.post("/{company_id}/train", status_code=status.HTTP_202_ACCEPTED)
async def train(
    company_id: CurrentTenant,
    body: TrainBody,
    settings: SettingsDep,
    mirror: MirrorDep,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> TrainAccepted:
    """Validate the tenant's data and queue a LoRA fine-tuning job."""
    tenant_dir = settings.tenant_data_dir(company_id)
    files = dataset.tenant_files(tenant_dir)
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

    client = await get_temporal(request)  # after validation: bad input never needs Temporal
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
    )
    try:
        await mirror.add(
            TRAINING_QUEUE,
            job_id,
            name="train",
            company_id=company_id,
            data=body.model_dump(exclude_none=True),
        )
    except (RedisError, OSError):
        pass  # the mirror is a cache; Temporal answers status queries without it
    try:
        await client.start_workflow(
            TrainingWorkflow.run,
            train_request,
            id=job_id,
            task_queue=TRAINING_QUEUE,
            search_attributes=job_search_attributes(company_id, JOB_KIND[TRAINING_QUEUE]),
            # The same Idempotency-Key maps to the same id: return the existing run.
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
    except RPCError as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"could not queue the job: {exc.message}"
        ) from exc
    return TrainAccepted(
        message="Training job queued",
        jobId=job_id,
        datasetSize=report.usable,
        qualityScore=report.quality_score,
    )
