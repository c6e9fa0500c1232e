"""Recorded histories replay against the current workflow code (a change that would break
running workflows fails here), and the replayer really catches such a change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.unit.careless_workflows import ReorderedTraining
from workflows.deployment import DeploymentWorkflow
from workflows.queue_control import QueueControlWorkflow
from workflows.training import TrainingWorkflow

HISTORIES = sorted((Path(__file__).resolve().parent.parent / "histories").glob("*.json"))
WORKFLOWS = [TrainingWorkflow, DeploymentWorkflow, QueueControlWorkflow]


def load(path: Path) -> WorkflowHistory:
    data = json.loads(path.read_text())
    first = data["events"][0]["workflowExecutionStartedEventAttributes"]
    return WorkflowHistory.from_json(first.get("workflowId", path.stem), data)


def test_histories_were_recorded() -> None:
    names = {p.stem for p in HISTORIES}
    assert {"training-autodeploy", "deployment", "training-paused", "queue-control"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_on_current_code(path: Path) -> None:
    result = await Replayer(workflows=WORKFLOWS).replay_workflow(load(path))
    assert result.replay_failure is None


async def test_replayer_catches_an_incompatible_change() -> None:
    path = next(p for p in HISTORIES if p.stem == "training-autodeploy")
    result = await Replayer(workflows=[ReorderedTraining]).replay_workflow(
        load(path), raise_on_replay_failure=False
    )
    assert result.replay_failure is not None
