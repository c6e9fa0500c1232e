"""DeploymentWorkflow: convert to GGUF if needed, publish, verify; roll back a failed publish."""

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

from workflows.common import JobWorkflow, retry_policy, root_message

with workflow.unsafe.imports_passed_through():
    from activities.deployment import DeploymentActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
    from tenanttune.jobs import JobState
    from tenanttune.settings import DEPLOYMENT_QUEUE
    from tenanttune.types import (
        ConvertRequest,
        DeployRequest,
        DeployResult,
        PublishRequest,
        PublishResult,
        VerifyRequest,
    )

VERIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_attempts=2,
    non_retryable_error_types=NON_RETRYABLE_ERRORS,
)
ROLLBACK_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=5)


@workflow.defn
class DeploymentWorkflow(JobWorkflow):
    QUEUE = DEPLOYMENT_QUEUE
    NAME = "deploy"

    @workflow.run
    async def run(self, req: DeployRequest) -> DeployResult:
        published: PublishResult | None = None
        try:
            await self._hold_while_paused(req)
            self._stage = "converting"
            await self._status(req, JobState.ACTIVE)
            gguf = await workflow.execute_activity_method(
                DeploymentActivities.convert_to_gguf,
                ConvertRequest(
                    job_id=req.job_id,
                    company_id=req.company_id,
                    model_path=req.model_path,
                    outtype=req.outtype,
                ),
                start_to_close_timeout=timedelta(hours=2),
                heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
                retry_policy=retry_policy(req.options),
            )
            self._stage, self._progress = "deploying", 40.0
            published = await workflow.execute_activity_method(
                DeploymentActivities.deploy_model,
                PublishRequest(
                    job_id=req.job_id,
                    company_id=req.company_id,
                    model_name=req.model_name,
                    target=req.target,
                    gguf=gguf,
                    source_model_path=req.model_path,
                    source_job=req.source_job,
                    quantize=req.quantize,
                ),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
                retry_policy=retry_policy(req.options),
            )
            self._stage, self._progress = "verifying", 70.0
            verification = await workflow.execute_activity_method(
                DeploymentActivities.verify_deployment,
                VerifyRequest(job_id=req.job_id, company_id=req.company_id, published=published),
                start_to_close_timeout=timedelta(minutes=15),
                heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
                retry_policy=VERIFY_RETRY,
            )
            await workflow.execute_activity_method(
                DeploymentActivities.finish_publish,
                published,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=ROLLBACK_RETRY,
            )
        except (ActivityError, ApplicationError, asyncio.CancelledError, CancelledError) as err:
            cancelled = is_cancelled_exception(err)
            reason = (
                f"cancelled during {self._stage}"
                if cancelled
                else f"{self._stage} failed: {root_message(err)}"
            )
            if published is not None and published.created:
                # Never leave a model that did not pass verification under the name.
                try:
                    await workflow.execute_activity_method(
                        DeploymentActivities.unpublish_model,
                        published,
                        start_to_close_timeout=timedelta(minutes=5),
                        retry_policy=ROLLBACK_RETRY,
                    )
                    reason += f"; {published.model_name} was removed"
                    if published.replaced_previous and published.target == "local":
                        reason += " and the previous version restored"
                except ActivityError as rollback:
                    reason += f"; removing {published.model_name} failed: "
                    reason += root_message(rollback)
            self._stage = "failed"
            await self._status(
                req,
                JobState.FAILED,
                failed_reason=reason,
                keep=req.options.remove_on_fail,
                attempts_made=req.options.attempts_before + 1,
            )
            if cancelled:
                raise
            raise ApplicationError(reason, non_retryable=True) from err
        result = DeployResult(
            model_name=published.model_name,
            target=published.target,
            location=published.location,
            digest=published.digest,
            gguf_path=gguf.gguf_path,
            verification=verification,
        )
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
