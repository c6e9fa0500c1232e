"""Heartbeats that cannot go missing on a live worker: recorded on a clock from the activity's
first moment, whatever it waits for (a silent child, a slow step, a slow Redis), and sent often
enough (the worker's throttle) that a busy event loop does not turn a live attempt into a
heartbeat timeout. Captured with ActivityEnvironment; no server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.proc import ScriptRun, WriteBehind, beat_interval, heartbeat_throttle, heartbeating
from activities.status import StatusActivities
from activities.training import TrainingActivities, _TrainingRun
from tenanttune.settings import Settings
from tenanttune.types import TrainingHyperparameters, TrainModelRequest


class Beats:
    """An ActivityEnvironment with a heartbeat timeout that records when each heartbeat came."""

    def __init__(self, timeout_s: float) -> None:
        self.env = ActivityEnvironment()
        self.env.info = dataclasses.replace(
            self.env.info, heartbeat_timeout=timedelta(seconds=timeout_s)
        )
        self.times: list[float] = []
        self.details: list[Any] = []
        self.env.on_heartbeat = self._on_heartbeat

    def _on_heartbeat(self, *details: Any) -> None:
        self.times.append(time.monotonic())
        self.details.append(details[0] if details else None)

    def gaps(self, start: float, end: float) -> list[float]:
        """Time between consecutive heartbeats, counting from `start` and up to `end`."""
        points = [start, *self.times, end]
        return [b - a for a, b in zip(points, points[1:], strict=False)]


@pytest.mark.parametrize("timeout_s", [10, 15, 60, 120, 600, 3600])
def test_a_heartbeat_reaches_the_server_several_times_per_timeout(timeout_s: int) -> None:
    # The SDK sends a recorded heartbeat at most once per min(0.8 x timeout, worker throttle);
    # between two sends at most one recording interval more passes.
    sdk_throttle = min(0.8 * timeout_s, heartbeat_throttle([timeout_s, 120]).total_seconds())
    worst_gap = sdk_throttle + beat_interval(timedelta(seconds=timeout_s))
    assert worst_gap <= 0.25 * timeout_s, "the event loop may stall for 3/4 of the timeout"
    # Not needlessly chatty either: at most one heartbeat a second per activity.
    assert heartbeat_throttle([timeout_s]) >= timedelta(seconds=1)


def test_without_a_heartbeat_timeout_it_still_beats() -> None:
    assert 0 < beat_interval(None) <= 5


async def test_a_child_that_prints_nothing_for_longer_than_the_timeout_still_heartbeats() -> None:
    beats = Beats(timeout_s=1.0)
    run = ScriptRun()
    run.details = {"step": 3}

    async def silent_child() -> int:
        # A child that prints nothing for 2.5 s (the standard library's timeit timing a sleep),
        # like a model that takes long to load.
        return await run.run("timeit", "-n", "1", "-r", "1", "import time; time.sleep(2.5)")

    start = time.monotonic()
    assert await beats.env.run(silent_child) == 0
    gaps = beats.gaps(start, time.monotonic())
    assert len(beats.times) >= 10, beats.times
    assert max(gaps) < 0.5, f"a heartbeat gap of {max(gaps):.2f} s with a 1 s timeout"
    assert beats.details[-1] == {"step": 3}


async def test_a_blocked_event_loop_delays_the_heartbeat_no_longer_than_the_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    beats = Beats(timeout_s=2.0)

    async def busy() -> None:
        async with heartbeating({"step": 1}):
            await asyncio.sleep(0.5)
            time.sleep(1.2)  # a blocked event loop: nothing runs, not even the heartbeat
            await asyncio.sleep(0.5)

    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await beats.env.run(busy)
    gaps = beats.gaps(start, time.monotonic())
    assert gaps[0] < 0.1, "the first heartbeat goes out on entry"
    assert max(gaps) < 1.2 + 0.2 + 0.2, gaps  # the block, one interval, some slack
    assert any("event loop was blocked" in r.getMessage() for r in caplog.records)


class HangingMirror:
    """A status writer whose Redis never answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def report_progress(self, *_: Any, **__: Any) -> None:
        self.calls += 1
        await asyncio.sleep(3600)

    async def record_event(self, *_: Any, **__: Any) -> None:
        self.calls += 1
        await asyncio.sleep(3600)


async def test_train_model_heartbeats_before_its_training_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the base model (seconds on a busy machine) happens inside the heartbeat."""
    settings = Settings(_env_file=None, state_dir=tmp_path)  # type: ignore[call-arg]
    acts = TrainingActivities(settings, cast(StatusActivities, HangingMirror()))

    async def slow_base() -> str:
        await asyncio.sleep(2.0)
        raise ApplicationError("stop here")

    monkeypatch.setattr(acts, "_tiny_base", slow_base)
    beats = Beats(timeout_s=1.0)
    req = TrainModelRequest(
        job_id="train-acme-1",
        company_id="acme",
        train_path="",
        validation_path="",
        base_model="",  # the tiny base, built first
        hyperparameters=TrainingHyperparameters(),
    )
    start = time.monotonic()
    with pytest.raises(ApplicationError, match="stop here"):
        await beats.env.run(acts.train_model, req)
    assert max(beats.gaps(start, time.monotonic())) < 0.5, beats.times


async def test_training_events_never_wait_for_the_mirror(tmp_path: Path) -> None:
    mirror = HangingMirror()
    settings = Settings(_env_file=None, state_dir=tmp_path)  # type: ignore[call-arg]
    details: dict[str, Any] = {"step": 0, "total": 0, "loss": None, "checkpoint": ""}
    run = _TrainingRun(cast(StatusActivities, mirror), "train-acme-1", details, settings)
    beats = Beats(timeout_s=10.0)
    run.writes = WriteBehind(limit=8)

    async def events() -> float:
        started = time.monotonic()
        async with run.writes.running(flush_s=0.2):
            for step in range(1, 101):
                run._on_event(  # what the reading loop calls for each line of the child
                    {
                        "event": "step",
                        "step": step,
                        "total_steps": 100,
                        "loss": 1.0,
                        "epoch": 0.1,
                        "lr": 0.001,
                        "tokens_per_s": 10.0,
                    }
                )
            run._on_event({"event": "checkpoint", "step": 100, "path": str(tmp_path)})
        return time.monotonic() - started

    took = await beats.env.run(events)
    assert took < 1.0, "a hanging Redis held the training's output up"
    assert details["step"] == 100 and details["checkpoint"] == str(tmp_path)
    assert beats.details == [details], "the checkpoint went out in a heartbeat at once"
    assert mirror.calls == 1 and run.writes.dropped > 0, "bounded: old cosmetic writes dropped"
