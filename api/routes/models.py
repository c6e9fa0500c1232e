"""Model jobs of one tenant: train and deploy. HTTP in, the job front door, HTTP out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import JSONResponse

from api.deps import CurrentPrincipal, CurrentTenant, JobsDep
from api.schemas import (
    DeployAccepted,
    DeployBody,
    JobOptionsBody,
    TrainAccepted,
    TrainBody,
    TrainFallback,
)
from jobs.errors import JobQueueUnavailable
from jobs.service import DeploySubmission, TrainSubmission
from tenanttune.auth import Principal

router = APIRouter(prefix="/api/ai/models", tags=["models"])
IdempotencyKey = Annotated[str | None, Header(max_length=200)]


def _priority_is_the_plans(body: JobOptionsBody, principal: Principal) -> None:
    """A tenant cannot jump ahead of the others: its jobs' priority comes from its plan."""
    if body.priority is not None and not principal.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "priority is set by your plan (TENANT_LIMITS, by an admin), not per job; leave it out",
        )


@router.post(
    "/{company_id}/train",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainAccepted,
    responses={200: {"model": TrainFallback, "description": "job queue down: run it by hand"}},
)
async def train(
    company_id: CurrentTenant,
    body: TrainBody,
    jobs: JobsDep,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> TrainAccepted | JSONResponse:
    """Validate the tenant's data and queue a LoRA fine-tuning job."""
    _priority_is_the_plans(body, principal)
    data, opts = body.sent()
    submission = TrainSubmission(
        hyperparameters=body.hyperparameters(),
        options=body.requested_options(),
        base_model=body.baseModel,
        version=body.version or "",
        auto_deploy=body.autoDeploy,
        deploy_version=body.deployVersion or "",
        data=data,
        opts=opts,
    )
    try:
        accepted = await jobs.train(company_id, submission, idempotency_key or body.jobId)
    except JobQueueUnavailable:
        manual = await jobs.manual_training(company_id, submission)
        answer = TrainFallback(
            message="Training data prepared. Run fine-tuning service manually:",
            instructions={
                "command": manual.command,
                "dataPath": manual.data_path,
                "configPath": manual.config_path,
            },
            note="Job queue unavailable. Use manual command above.",
        )
        return JSONResponse(status_code=200, content=answer.model_dump())
    return TrainAccepted(
        message="Training job queued",
        jobId=accepted.job_id,
        datasetSize=accepted.dataset_size,
        qualityScore=accepted.quality_score,
    )


@router.post(
    "/{company_id}/deploy",
    status_code=status.HTTP_202_ACCEPTED,
    responses={400: {"description": "modelPath or version not allowed; nothing queued"}},
)
async def deploy(
    company_id: CurrentTenant,
    body: DeployBody,
    jobs: JobsDep,
    principal: CurrentPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> DeployAccepted:
    """Queue a job that converts a trained model to GGUF, publishes it and checks it answers."""
    _priority_is_the_plans(body, principal)
    data, opts = body.sent()
    accepted = await jobs.deploy(
        company_id,
        DeploySubmission(
            model_path=body.modelPath,
            version=body.version,
            outtype=body.outtype,
            quantize=body.quantize,
            options=body.requested_options(),
            data=data,
            opts=opts,
        ),
        idempotency_key or body.jobId,
    )
    return DeployAccepted(
        message="Deployment job queued", jobId=accepted.job_id, modelName=accepted.model_name
    )
