"""QueueControlWorkflow: the durable paused/resumed switch of one queue (Bull's pause/resume)."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from tenanttune.types import QueueState
    from tenanttune.vocab import PAUSED_QUERY

CHANGES_PER_RUN = 200  # then continue-as-new, so the history stays short


@workflow.defn
class QueueControlWorkflow:
    def __init__(self) -> None:
        self._paused = False
        self._changes = 0

    @workflow.run
    async def run(self, state: QueueState) -> None:
        if self._changes == 0:  # a signal sent with the start has already set the state
            self._paused = state.paused
        await workflow.wait_condition(
            lambda: self._changes >= CHANGES_PER_RUN and workflow.all_handlers_finished()
        )
        workflow.continue_as_new(QueueState(queue=state.queue, paused=self._paused))

    @workflow.signal
    def pause(self) -> None:
        self._paused = True
        self._changes += 1

    @workflow.signal
    def resume(self) -> None:
        self._paused = False
        self._changes += 1

    @workflow.query(name=PAUSED_QUERY)
    def paused(self) -> bool:
        return self._paused
