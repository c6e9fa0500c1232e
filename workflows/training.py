"""TrainingWorkflow: export the tenant's data, train a LoRA adapter, register the model."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ChildWorkflowError, is_cancelled_exception
from temporalio.workflow import ActivityCancellationType

from workflows.common import JobWorkflow, retry_policy, root_message
from workflows.deployment import DeploymentWorkflow

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from activities.training import TrainingActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, slots_queue
    from tenanttune.temporal import job_search_attributes
    from tenanttune.types import (
        DeployRequest,
        ExportRequest,
        RegisterModelRequest,
        TrainModelRequest,
        TrainRequest,
        TrainResult,
    )
    from tenanttune.vocab import model_name

# While the tenant is at its running-jobs limit: ask again, more slowly, for up to a day.
ADMISSION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=0,
)
SHORT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)


@workflow.defn
class TrainingWorkflow(JobWorkflow[TrainRequest, TrainResult]):
    QUEUE = TRAINING_QUEUE
    NAME = "train"
    FIRST_STAGE = "exporting"

    @workflow.run
    async def run(self, req: TrainRequest) -> TrainResult:
        return await self.execute(req)

    async def steps(self, req: TrainRequest) -> TrainResult:
        """Export the tenant's data, train a LoRA adapter, register it (then maybe deploy)."""
        self.set_stage("exporting")
        export = await workflow.execute_activity_method(
            TrainingActivities.export_training_data,
            ExportRequest(
                job_id=req.job_id,
                company_id=req.company_id,
                hyperparameters=req.hyperparameters,
                base_model=req.base_model,
            ),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=SHORT_RETRY,
        )
        self.set_stage("training", 5.0)
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
            # Its own task queue: a worker takes a training only when it has a free slot.
            task_queue=slots_queue(workflow.info().task_queue),
            start_to_close_timeout=timedelta(seconds=req.train_timeout_s),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
            retry_policy=retry_policy(req.options),
            # A cancelled job is reported once its training process is gone, so its slot is
            # free and a retry never meets a process still writing checkpoints.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self.set_stage("registering", 95.0)
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
            self.set_stage("deploying")
            result.deployment = await self._deploy(req, result)
        return result

    async def _deploy(self, req: TrainRequest, trained: TrainResult) -> dict[str, Any]:
        """Deploy the new model as a child job; its failure is reported, not fatal here."""
        version = req.deploy_version or trained.version
        job_id = f"deploy-{req.company_id}-{workflow.uuid4().hex[:16]}"
        name = model_name(trained.base_short_name, req.company_id, version)
        info: dict[str, Any] = {"jobId": job_id, "modelName": name}
        try:
            if workflow.patched("autodeploy-admission"):
                # The child is one more running job of the tenant: it waits for the tenant's
                # running-jobs quota like any job started through the front door.
                await workflow.execute_activity_method(
                    AdmissionActivities.admit_child_job,
                    req.company_id,
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(hours=24),
                    retry_policy=ADMISSION_RETRY,
                )
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
        except (ChildWorkflowError, ActivityError) as err:
            if is_cancelled_exception(err):
                raise
            return {**info, "state": "failed", "failedReason": root_message(err)}
        return {**info, "state": "completed", "result": asdict(deployed)}
