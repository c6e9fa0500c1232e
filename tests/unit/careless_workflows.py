"""A careless change to TrainingWorkflow, for the replay test (its own module: the workflow
sandbox re-imports the module a workflow class lives in)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow


@workflow.defn(name="TrainingWorkflow")
class ReorderedTraining:
    """A timer added before the first step: histories recorded before it no longer fit."""

    @workflow.run
    async def run(self, _req: object) -> None:
        await workflow.sleep(timedelta(seconds=1))
