"""Admission of jobs that a workflow starts itself (the autoDeploy child), under the same quota
the front door applies to jobs started through it."""

from __future__ import annotations

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tenanttune.mirror import JobMirror
from tenanttune.settings import QUEUES, Settings


class AdmissionActivities:
    def __init__(self, settings: Settings, mirror: JobMirror) -> None:
        self.settings = settings
        self.mirror = mirror

    @activity.defn
    async def admit_child_job(self, company_id: str) -> None:
        """Return when the tenant may start one more running job; a retryable error while it is
        at TENANT_MAX_RUNNING_JOBS (the workflow retries with backoff until a job finishes).

        The calling job is itself one of the tenant's running jobs and is not counted. Without
        Redis there is nothing to count: the child is admitted, as the front door does for a
        job whose tenant it cannot count.
        """
        limit = self.settings.limit(company_id, "max_running_jobs")
        try:
            running, _ = await self.mirror.tenant_load(list(QUEUES), company_id)
        except OSError:
            return
        except Exception as exc:  # noqa: BLE001 - redis errors: admit, see above
            activity.logger.warning("cannot count %s's jobs (%s); admitting", company_id, exc)
            return
        others = max(running - 1, 0)
        if others >= limit:
            raise ApplicationError(
                f"company '{company_id}' has {others} other jobs running, its limit is {limit} "
                "(TENANT_MAX_RUNNING_JOBS); the deployment starts when one finishes",
                type="TenantAtRunningLimit",
            )
