"""TrainingWorkflow: export the tenant's data, train a LoRA adapter, register the model."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    is_cancelled_exception,
)

from workflows.common import JobWorkflow, retry_policy, root_message
from workflows.deployment import DeploymentWorkflow

with workflow.unsafe.imports_passed_through():
    from activities.training import TrainingActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.jobs import JobState, model_name
    from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE
    from tenanttune.temporal import job_search_attributes
    from tenanttune.types import (
        DeployRequest,
        ExportRequest,
        RegisterModelRequest,
        TrainModelRequest,
        TrainRequest,
        TrainResult,
    )

SHORT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)


@workflow.defn
class TrainingWorkflow(JobWorkflow):
    QUEUE = TRAINING_QUEUE
    NAME = "train"

    @workflow.run
    async def run(self, req: TrainRequest) -> TrainResult:
        try:
            await self._hold_while_paused(req)
            self._stage = "exporting"
            await self._status(req, JobState.ACTIVE)
            result = await self._train(req)
        except (ActivityError, ApplicationError, asyncio.CancelledError, CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            if cancelled:
                reason = f"cancelled during {self._stage}"
            else:
                reason = f"{self._stage} failed: {root_message(err)}"
            self._stage = "failed"
            await self._status(
                req,
                JobState.FAILED,
                failed_reason=reason,
                keep=req.options.remove_on_fail,
                attempts_made=req.options.attempts_before + 1,
            )
            if cancelled:
                raise  # Temporal records the run as cancelled
            raise ApplicationError(reason, non_retryable=True) from err
        self._stage, self._progress = "completed", 100.0
        await self._status(
            req,
            JobState.COMPLETED,
            result=asdict(result),
            progress=100.0,
            keep=req.options.remove_on_complete,
            attempts_made=req.options.attempts_before + 1,
        )
        return result

    async def _train(self, req: TrainRequest) -> TrainResult:
        self._stage = "exporting"
        export = await workflow.execute_activity_method(
            TrainingActivities.export_training_data,
            ExportRequest(job_id=req.job_id, company_id=req.company_id),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=SHORT_RETRY,
        )
        self._stage, self._progress = "training", 5.0
        trained = await workflow.execute_activity_method(
            TrainingActivities.train_model,
            TrainModelRequest(
                job_id=req.job_id,
                company_id=req.company_id,
                train_path=export.train_path,
                validation_path=export.validation_path,
                base_model=req.base_model,
                hyperparameters=req.hyperparameters,
                save_steps=req.save_steps,
            ),
            start_to_close_timeout=timedelta(seconds=req.train_timeout_s),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
            retry_policy=retry_policy(req.options),
        )
        self._stage, self._progress = "registering", 95.0
        result = await workflow.execute_activity_method(
            TrainingActivities.register_model,
            RegisterModelRequest(
                job_id=req.job_id,
                company_id=req.company_id,
                version=req.version or req.job_id,
                adapter_path=trained.adapter_path,
                base_model=trained.base_model,
                hyperparameters=req.hyperparameters,
                export=export,
                metrics=trained.metrics,
            ),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=SHORT_RETRY,
        )

        if req.auto_deploy:
            self._stage = "deploying"
            result.deployment = await self._deploy(req, result)
        return result

    async def _deploy(self, req: TrainRequest, trained: TrainResult) -> dict[str, Any]:
        """Deploy the new model as a child job; its failure is reported, not fatal here."""
        version = req.deploy_version or trained.version
        job_id = f"deploy-{req.company_id}-{workflow.uuid4().hex[:16]}"
        name = model_name(trained.base_short_name, req.company_id, version)
        info: dict[str, Any] = {"jobId": job_id, "modelName": name}
        try:
            deployed = await workflow.execute_child_workflow(
                DeploymentWorkflow.run,
                DeployRequest(
                    job_id=job_id,
                    company_id=req.company_id,
                    model_path=trained.model_path,
                    version=version,
                    model_name=name,
                    target=req.deploy_target,
                    source_job=req.job_id,
                    outtype=req.deploy_outtype,
                    quantize=req.deploy_quantize,
                    options=req.deploy_options,
                    heartbeat_timeout_s=req.deploy_heartbeat_timeout_s,
                ),
                id=job_id,
                task_queue=DEPLOYMENT_QUEUE,
                search_attributes=job_search_attributes(req.company_id, "deployment", version),
                static_summary=f"deploy {name} for {req.company_id} (from {req.job_id})",
            )
        except ChildWorkflowError as err:
            if is_cancelled_exception(err):
                raise
            return {**info, "state": "failed", "failedReason": root_message(err)}
        return {**info, "state": "completed", "result": asdict(deployed)}
