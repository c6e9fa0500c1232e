"""Whether a queue is paused, asked of its QueueControlWorkflow."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from tenanttune.vocab import PAUSED_QUERY, control_workflow_id


class QueueActivities:
    def __init__(self, client: Client) -> None:
        self.client = client

    @activity.defn
    async def queue_paused(self, queue: str) -> bool:
        """True while the queue is paused; a queue never paused has no control workflow."""
        # By name: activities sit below workflows/ and do not import them (the front door uses
        # the typed `QueueControlWorkflow.paused`); the workflow names its query with this one.
        handle = self.client.get_workflow_handle(control_workflow_id(queue))
        try:
            return bool(await handle.query(PAUSED_QUERY, result_type=bool))
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
