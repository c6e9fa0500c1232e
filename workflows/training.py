"""TrainingWorkflow: export the tenant's data, train a LoRA adapter, register the model."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from activities.status import StatusActivities
    from activities.training import TrainingActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.jobs import JobState
    from tenanttune.settings import TRAINING_QUEUE
    from tenanttune.types import (
        ExportRequest,
        JobProgress,
        RegisterModelRequest,
        StatusUpdate,
        TrainModelRequest,
        TrainRequest,
        TrainResult,
    )

# The seed's policy: 2 attempts, exponential backoff from 5 s.
TRAIN_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_attempts=2,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
SHORT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
STATUS_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)


@workflow.defn
class TrainingWorkflow:
    def __init__(self) -> None:
        self._stage = "waiting"
        self._progress = 0.0

    @workflow.run
    async def run(self, req: TrainRequest) -> TrainResult:
        self._stage = "exporting"
        await self._status(req, JobState.ACTIVE)
        try:
            result = await self._train(req)
        except (ActivityError, ApplicationError, asyncio.CancelledError, CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            if cancelled:
                reason = f"cancelled during {self._stage}"
            else:
                reason = f"{self._stage} failed: {_root_message(err)}"
            self._stage = "failed"
            await self._status(req, JobState.FAILED, failed_reason=reason)
            if cancelled:
                raise  # Temporal records the run as cancelled
            raise ApplicationError(reason, non_retryable=True) from err
        self._stage, self._progress = "completed", 100.0
        await self._status(req, JobState.COMPLETED, result=asdict(result), progress=100.0)
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
            retry_policy=TRAIN_RETRY,
        )
        self._stage, self._progress = "registering", 95.0
        return await workflow.execute_activity_method(
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

    @workflow.query
    def progress(self) -> JobProgress:
        """Stage and coarse progress; step-level progress is in the training heartbeat."""
        return JobProgress(stage=self._stage, progress=self._progress)

    async def _status(self, req: TrainRequest, state: JobState, **fields: object) -> None:
        """Mirror a transition into Redis. Best effort: its failure never fails the job."""
        update = StatusUpdate(
            job_id=req.job_id,
            queue=TRAINING_QUEUE,
            company_id=req.company_id,
            name="train",
            state=state.value,
            stage=self._stage,
            attempts_made=workflow.info().attempt,
            **fields,  # type: ignore[arg-type]
        )
        try:
            await workflow.execute_activity_method(
                StatusActivities.record_status,
                update,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=STATUS_RETRY,
            )
        except ActivityError:
            workflow.logger.warning("status %s of %s not mirrored", state, req.job_id)


def _root_message(err: BaseException) -> str:
    """The innermost failure's message: what actually went wrong."""
    while err.__cause__ is not None:
        err = err.__cause__
    return getattr(err, "message", None) or str(err)
