"""DeploymentWorkflow: convert to GGUF if needed, publish, verify; roll back a failed publish."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.workflow import ActivityCancellationType

from workflows.common import JobWorkflow, retry_policy, root_message

with workflow.unsafe.imports_passed_through():
    from activities.deployment import DeploymentActivities
    from tenanttune.errors import NON_RETRYABLE_ERRORS
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
class DeploymentWorkflow(JobWorkflow[DeployRequest, DeployResult]):
    QUEUE = DEPLOYMENT_QUEUE
    NAME = "deploy"
    FIRST_STAGE = "converting"

    def __init__(self) -> None:
        super().__init__()
        self._publishing: PublishRequest | None = None
        self._published: PublishResult | None = None

    @workflow.run
    async def run(self, req: DeployRequest) -> DeployResult:
        return await self.execute(req)

    async def steps(self, req: DeployRequest) -> DeployResult:
        """Convert to GGUF, publish under the model name, check it answers, make it final."""
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
        self.set_stage("deploying", 40.0)
        self._publishing = PublishRequest(
            job_id=req.job_id,
            company_id=req.company_id,
            model_name=req.model_name,
            target=req.target,
            gguf=gguf,
            source_model_path=req.model_path,
            source_job=req.source_job,
            quantize=req.quantize,
        )
        published = self._published = await workflow.execute_activity_method(
            DeploymentActivities.deploy_model,
            self._publishing,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(seconds=req.heartbeat_timeout_s),
            retry_policy=retry_policy(req.options),
            # A publish cannot stop half-way: wait until it has landed or not, then undo.
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self.set_stage("verifying", 70.0)
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
        return DeployResult(
            model_name=published.model_name,
            target=published.target,
            location=published.location,
            digest=published.digest,
            gguf_path=gguf.gguf_path,
            verification=verification,
        )

    async def on_failure(self, req: DeployRequest, cancelled: bool) -> str:  # noqa: ARG002
        """Never leave a model that did not pass verification under the name."""
        published = self._published
        if published is None and self._publishing is not None:
            # Stopped while publishing: what landed under the name, if it is this job's, goes.
            return await self._withdraw(self._publishing)
        if published is None or not published.created:
            return ""
        try:
            await workflow.execute_activity_method(
                DeploymentActivities.unpublish_model,
                published,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=ROLLBACK_RETRY,
            )
        except ActivityError as rollback:
            return f"; removing {published.model_name} failed: {root_message(rollback)}"
        note = f"; {published.model_name} was removed"
        if published.replaced_previous and published.target == "local":
            note += " and the previous version restored"
        return note

    async def _withdraw(self, publishing: PublishRequest) -> str:
        try:
            withdrawn = await workflow.execute_activity_method(
                DeploymentActivities.withdraw_publication,
                publishing,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=ROLLBACK_RETRY,
            )
        except ActivityError as err:
            return f"; removing {publishing.model_name} failed: {root_message(err)}"
        return f"; {publishing.model_name} was removed" if withdrawn else ""
