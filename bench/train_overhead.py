"""Orchestration overhead: one training job through the API vs the bare training command.

On a private stack, alternates N runs of each (job, bare, bare, job, …):
  job:  POST /api/ai/models/<tenant>/train, poll GET /api/ai/jobs/<id> until completed
  bare: python -m training.train on the same exported split, base model and hyperparameters
and prints median wall times, the ratio, and where the difference goes (from the workflow
history: queue latency, status writes, export, the training activity, registration).
Run: `python bench/train_overhead.py [--runs 2] [--epochs 36]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    PrivateStack,
    Row,
    Section,
    machine,
    median,
    run_measured,
    span,
    stack_or,
    submit,
    today,
    wait_finished,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from training.spec import TrainingHyperparameters
from training.train import TrainConfig

COMPANY = "overhead"


def run_job(st: PrivateStack, body: dict[str, Any]) -> tuple[float, float, dict[str, Any]]:
    """(wall s from POST to the API answering `completed`, accept epoch time, last answer).

    The end is awaited on Temporal's long poll for the workflow's result, then confirmed with
    one GET: polling the API every few ms would itself take CPU from the training.
    """
    http = st.http(COMPANY)

    async def finished(job_id: str) -> None:
        client = await Client.connect(st.settings.temporal_address)
        await client.get_workflow_handle(job_id).result()

    t0 = time.perf_counter()
    job_id = submit(http, COMPANY, body)
    accepted = time.time()
    asyncio.run(finished(job_id))
    job = wait_finished(http, [job_id], poll_s=0.01)[job_id]
    return time.perf_counter() - t0, accepted, job


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def run_bare(st: PrivateStack, body: dict[str, Any], out: Path) -> tuple[float, float]:
    """(wall s, s from process start to the `start` event: imports, model load, tokenise)."""
    s = st.settings
    cfg = TrainConfig(
        base_model=str(s.tiny_base_dir),
        train_file=str(s.data_dir / f"{COMPANY}-training.jsonl"),
        eval_file=str(s.data_dir / f"{COMPANY}-validation.jsonl"),
        output_dir=str(out),
        hyperparameters=TrainingHyperparameters.from_wire(body),
        save_steps=s.train_save_steps,
    )
    config = out.with_name(out.name + "-config.json")
    config.write_text(cfg.to_json())
    cmd = [sys.executable, "-m", "training.train", "--config", str(config)]
    done = run_measured(cmd)
    start = next(json.loads(x) for x in done.stdout.splitlines() if '"start"' in x)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + "-checkpoints"), ignore_errors=True)
    return done.wall_s, float(start.get("load_s", 0.0))


async def breakdown(
    st: PrivateStack, job_id: str, accepted: float, wall: float
) -> dict[str, float]:
    """Seconds spent in each part of a finished job, from its workflow history."""
    client = await Client.connect(st.settings.temporal_address)
    history = await client.get_workflow_handle(job_id).fetch_history()
    names: dict[int, str] = {}
    sched: dict[int, float] = {}
    started: dict[int, float] = {}
    parts = {"queue": 0.0, "status": 0.0, "export": 0.0, "train": 0.0, "register": 0.0}
    first_task = None
    closed = 0.0
    for e in history.events:
        t = e.event_time.ToMicroseconds() / 1e6
        closed = t
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and first_task is None:
            first_task = t
            parts["queue"] += t - accepted
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
            sched[e.event_id] = t
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            sid = e.activity_task_started_event_attributes.scheduled_event_id
            started[sid] = t
            parts["queue"] += t - sched[sid]
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            sid = e.activity_task_completed_event_attributes.scheduled_event_id
            name = names[sid]
            key = {
                "export_training_data": "export",
                "train_model": "train",
                "register_model": "register",
            }.get(name, "status")
            parts[key] += t - started[sid]
    parts["rest"] = wall - sum(parts.values())
    parts["accept_to_close"] = closed - accepted
    return parts


def run(
    runs: int = 2, epochs: int = 36, shared: PrivateStack | None = None
) -> tuple[Section, dict[str, Any]]:
    body = {"epochs": epochs, "batchSize": 8, "learningRate": 0.002}
    jobs: list[float] = []
    bares: list[float] = []
    loads: list[float] = []
    parts: list[dict[str, float]] = []
    job_cpu: list[dict[str, float]] = []  # CPU s of the stack's processes meanwhile
    bare_cpu: list[dict[str, float]] = []
    with stack_or(shared, [COMPANY]) as st:
        run_job(st, {**body, "epochs": 1})  # warm-up: builds the tiny base, exports the data
        order = ["job", "bare", "bare", "job"] * ((runs + 1) // 2)
        for i, kind in enumerate(order[: 2 * runs]):
            cpu0 = st.cpu_s()
            if kind == "job":
                wall, accepted, job = run_job(st, body)
                jobs.append(wall)
                job_cpu.append(cpu_delta(cpu0, st.cpu_s()))
                parts.append(asyncio.run(breakdown(st, job["jobId"], accepted, wall)))
                steps = job["result"]["metrics"]["steps"]
            else:
                wall, load = run_bare(st, body, st.root / f"bare-{i}")
                bares.append(wall)
                bare_cpu.append(cpu_delta(cpu0, st.cpu_s()))
                loads.append(load)
            print(f"  {kind:4} {wall:6.2f} s", flush=True)
    mj, mb = median(jobs), median(bares)
    part = {k: median([p[k] for p in parts]) for k in parts[0]}
    cpu_job = {k: median([c[k] for c in job_cpu]) for k in job_cpu[0]}
    cpu_bare = {k: median([c.get(k, 0.0) for c in bare_cpu]) for k in job_cpu[0]}
    lines = [
        f"machine: {machine()} · date: {today()}",
        "",
        f"workload: tiny Mistral, tenant acme's data (320 examples), epochs {epochs}, batch 8, "
        f"lr 0.002, {steps} optimizer steps; {runs} runs each, alternating job, bare, bare, job. "
        "The job is timed from the POST to the API answering `completed` (awaited on Temporal's "
        "long poll for the result, then one GET).",
        "",
        "| path | runs | median s | min–max s |",
        "|---|---|---|---|",
        f"| job through API → Temporal → worker → subprocess | {len(jobs)} | {mj:.2f} | "
        f"{span(jobs)} |",
        f"| bare `python -m training.train` | {len(bares)} | {mb:.2f} | {span(bares)} |",
        f"| **ratio job / bare** | | **{mj / mb:.3f}** | |",
        "",
        "Where the job's time goes (medians, from the workflow history):",
        "",
        "| part | s |",
        "|---|---|",
        f"| queue latency: accept → first workflow task, plus every activity's scheduled → "
        f"started | {part['queue']:.2f} |",
        f"| status activities (Redis mirror writes) | {part['status']:.2f} |",
        f"| export (validate, split, write) | {part['export']:.2f} |",
        f"| `train_model` activity: subprocess start, imports, model load, training, save | "
        f"{part['train']:.2f} |",
        f"| … the same command run bare | {mb:.2f} |",
        f"| … of which imports + model load + tokenisation (bare, to the `start` event) | "
        f"{median(loads):.2f} |",
        f"| register (copy, manifest, rename) | {part['register']:.2f} |",
        f"| the rest: workflow tasks, the POST, the final GET | {part['rest']:.2f} |",
        "",
        "CPU used by the stack's own processes while training ran (the 2 cores are shared "
        "with the training process; medians, CPU seconds):",
        "",
        "| process | during a job | during a bare run (stack idle) |",
        "|---|---|---|",
        *(f"| {name} | {cpu_job[name]:.2f} | {cpu_bare[name]:.2f} |" for name in sorted(cpu_job)),
        f"| **all** | **{sum(cpu_job.values()):.2f}** | {sum(cpu_bare.values()):.2f} |",
    ]
    rows = [
        Row(
            f"orchestration overhead: job wall / bare command ({mb:.0f} s job)",
            f"{mj:.1f} s",
            f"{mb:.1f} s (bare)",
            f"{mj / mb:.3f}",
            "≤ 1.05",
        )
    ]
    section = Section(
        "Orchestration overhead of a training job",
        f"python bench/train_overhead.py --runs {runs} --epochs {epochs}",
        "\n".join(lines),
        rows,
    )
    return section, part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=36, help="36: a job of about a minute")
    args = parser.parse_args()
    section, _ = run(args.runs, args.epochs)
    print(section.body)


if __name__ == "__main__":
    main()
