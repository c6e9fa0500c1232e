"""Job start latency: API accept → the training activity running, over many jobs.

On a private stack, one job at a time (an idle worker, no backlog): POST /train, then watch
Temporal's describe until the `train_model` activity has started, then cancel the job and wait
for it to close before the next. Reports p50/p99 of accept → training running (Temporal's
`last_started_time` of the activity against the client's clock at the 202; one machine, one
clock) and its parts from the workflow history. Also times the POST itself (submit).
Run: `python bench/job_latency.py [--jobs 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from harness import PrivateStack, Row, Section, machine, median, pct, stack_or, today
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus

COMPANY = "latency"
BODY = {"epochs": 1, "batchSize": 8, "learningRate": 0.002}


@dataclass
class Latency:
    submit_ms: list[float] = field(default_factory=list)  # POST sent → 202 received
    start_ms: list[float] = field(default_factory=list)  # 202 → train_model running
    parts_ms: dict[str, list[float]] = field(default_factory=dict)

    def add_part(self, name: str, ms: float) -> None:
        self.parts_ms.setdefault(name, []).append(ms)


async def _train_started(client: Client, job_id: str, timeout_s: float = 120) -> float:
    """Epoch seconds at which the job's train_model activity started (polls describe)."""
    handle = client.get_workflow_handle(job_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        desc = await handle.describe()
        for act in desc.raw_description.pending_activities:
            if (
                act.activity_type.name == "train_model"
                and act.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
            ):
                return float(act.last_started_time.ToMicroseconds()) / 1e6
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise SystemExit(f"job {job_id} ended ({desc.status}) before training started")
        await asyncio.sleep(0.01)
    raise SystemExit(f"job {job_id}: training did not start within {timeout_s:.0f} s")


async def _parts(
    client: Client, job_id: str, accepted: float, train_started: float
) -> dict[str, float]:
    """accept → workflow task, export (queue + run), export done → train scheduled → started."""
    history = await client.get_workflow_handle(job_id).fetch_history()
    scheduled: dict[int, tuple[str, float]] = {}
    times: dict[str, float] = {}
    for e in history.events:
        t = e.event_time.ToMicroseconds() / 1e6
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and "wf_task" not in times:
            times["wf_task"] = t
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = e.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[e.event_id] = (name, t)
            times.setdefault(f"{name}:scheduled", t)
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            name, _ = scheduled[e.activity_task_started_event_attributes.scheduled_event_id]
            times.setdefault(f"{name}:started", t)
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name, _ = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
            times.setdefault(f"{name}:completed", t)
    ex = "export_training_data"
    return {
        "202 received → first workflow task (< 0: it began before the 202 arrived)": (
            times["wf_task"] - accepted
        ),
        "workflow task → export scheduled (pause check, status)": times[f"{ex}:scheduled"]
        - times["wf_task"],
        "export queued (scheduled → started)": times[f"{ex}:started"] - times[f"{ex}:scheduled"],
        "export run": times[f"{ex}:completed"] - times[f"{ex}:started"],
        "export done → train scheduled": times["train_model:scheduled"] - times[f"{ex}:completed"],
        "train queued (scheduled → started)": train_started - times["train_model:scheduled"],
    }


async def measure(st: PrivateStack, jobs: int) -> Latency:
    import httpx

    out = Latency()
    client = await Client.connect(st.settings.temporal_address)
    async with httpx.AsyncClient(
        base_url=st.base_url, timeout=60, headers=st.headers(COMPANY)
    ) as http:
        for i in range(jobs + 1):  # the first one is a warm-up (imports, connections)
            t0 = time.time()
            resp = await http.post(f"/api/ai/models/{COMPANY}/train", json=BODY)
            accepted = time.time()
            resp.raise_for_status()
            job_id = resp.json()["jobId"]
            started = await _train_started(client, job_id)
            handle = client.get_workflow_handle(job_id)
            await handle.cancel()
            while (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
                await asyncio.sleep(0.02)
            if i == 0:
                continue
            out.submit_ms.append((accepted - t0) * 1000)
            out.start_ms.append((started - accepted) * 1000)
            for name, s in (await _parts(client, job_id, accepted, started)).items():
                out.add_part(name, s * 1000)
    return out


def run(jobs: int = 20, shared: PrivateStack | None = None) -> tuple[Section, Latency]:
    with stack_or(shared, [COMPANY]) as st:
        lat = asyncio.run(measure(st, jobs))
    lines = [
        f"machine: {machine()} · date: {today()}",
        "",
        f"workload: {jobs} training jobs of tenant acme's data (320 examples), one at a time on "
        "an idle private stack (dev server, SQLite); each is cancelled once training runs.",
        "",
        "| measure | jobs | p50 ms | p99 ms | min–max ms |",
        "|---|---|---|---|---|",
        f"| submit: POST /train → 202 (validate data, start workflow) | {len(lat.submit_ms)} | "
        f"{median(lat.submit_ms):.1f} | {pct(lat.submit_ms, 99):.1f} | "
        f"{min(lat.submit_ms):.1f}–{max(lat.submit_ms):.1f} |",
        f"| **start: 202 → `train_model` activity running** | {len(lat.start_ms)} | "
        f"**{median(lat.start_ms):.1f}** | **{pct(lat.start_ms, 99):.1f}** | "
        f"{min(lat.start_ms):.1f}–{max(lat.start_ms):.1f} |",
    ]
    for name, xs in lat.parts_ms.items():
        lines.append(
            f"| … {name} | {len(xs)} | {median(xs):.1f} | {pct(xs, 99):.1f} | "
            f"{min(xs):.1f}–{max(xs):.1f} |"
        )
    rows = [
        Row(
            "job start latency: API accept → training running, p50 / p99 ms",
            f"{median(lat.start_ms):.0f} / {pct(lat.start_ms, 99):.0f}",
            "",
            "",
        )
    ]
    section = Section(
        "Job start latency", f"python bench/job_latency.py --jobs {jobs}", "\n".join(lines), rows
    )
    return section, lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    section, _ = run(args.jobs)
    print(section.body)


if __name__ == "__main__":
    main()
