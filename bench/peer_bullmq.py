"""The peer the seed replaced: BullMQ (Node) on the same Redis, against our submit, pickup and
status paths.

`bench/peers/bullmq_bench.mjs` (BullMQ from bench/peers/package-lock.json; `npm ci` there
first) adds jobs one at a time (Queue.add), times an idle Worker's pickup of each (add →
processor running), then answers status cells on request. Ours, in the same run:
  submit: POST /api/ai/models/<id>/train → 202 (validates the data, starts the workflow)
  pickup: 202 → the `train_model` activity running (see bench/job_latency.py)
  status: the Python facade's `get_job` + `get_state` (Bull's read, straight to Redis) against
          BullMQ's `getJob` + `getState`, cell by cell at 1, 8 and 32 concurrent callers.
BullMQ uses Redis database 11 (`PEER_REDIS_URL`) under a queue name of its own, removed at the
end. Run: `python bench/peer_bullmq.py [--jobs 20] [--seconds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
import uuid
from typing import Any

from harness import REPO, PrivateStack, Row, Section, machine, median, pct, today
from job_latency import Latency
from status_queries import fill_mirror

from jobs.bull import Queue
from jobs.service import JobService
from tenanttune.mirror import JobMirror
from tenanttune.settings import TRAINING_QUEUE, Settings
from tenanttune.vocab import JobState

PEERS = REPO / "bench" / "peers"
PEER_REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/11")


async def facade_cell(queue: Queue, job_id: str, clients: int, seconds: float) -> list[float]:
    """Closed loop: `clients` callers doing get_job + get_state, like the Bull snippet."""

    async def read() -> float:
        t0 = time.perf_counter()
        job = await queue.get_job(job_id)
        if job is None or await job.get_state() != "completed":
            raise SystemExit(f"facade: {job_id} is not a completed job in the mirror")
        return (time.perf_counter() - t0) * 1000

    await asyncio.gather(*(read() for _ in range(clients)))
    deadline = time.perf_counter() + seconds

    async def caller() -> list[float]:
        out: list[float] = []
        while time.perf_counter() < deadline:
            out.append(await read())
        return out

    return [x for xs in await asyncio.gather(*(caller() for _ in range(clients))) for x in xs]


async def _no_temporal() -> Any:
    raise RuntimeError("the facade asked Temporal: the job should be answered from the mirror")


def run(
    jobs: int = 20,
    seconds: float = 3.0,
    levels: tuple[int, ...] = (1, 8, 32),
    latency: Latency | None = None,
    shared: PrivateStack | None = None,
) -> Section:
    if not (PEERS / "node_modules" / "bullmq").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PEERS, check=True)
    if latency is None:
        import job_latency

        _, latency = job_latency.run(jobs, shared)
    node = subprocess.Popen(
        ["node", "bullmq_bench.mjs", PEER_REDIS_URL, str(jobs)],
        cwd=PEERS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert node.stdin is not None and node.stdout is not None
    prefix = f"bull-bench-{uuid.uuid4().hex[:8]}"
    mirror = JobMirror.from_url(PEER_REDIS_URL, prefix)
    queue = Queue(TRAINING_QUEUE, JobService(Settings(), mirror, _no_temporal))
    job_id = "train-peer-0000000000000001"
    status: list[tuple[int, list[float], list[float]]] = []
    loop = asyncio.new_event_loop()
    try:
        peer = json.loads(node.stdout.readline())
        loop.run_until_complete(fill_mirror(mirror, "peer", JobState.COMPLETED, 1, 2))
        for clients in levels:  # alternate: BullMQ's cell, then ours, at each level
            node.stdin.write(f"status {clients} {seconds}\n")
            node.stdin.flush()
            theirs = json.loads(node.stdout.readline())["latencies_ms"]
            ours = loop.run_until_complete(facade_cell(queue, job_id, clients, seconds))
            status.append((clients, ours, theirs))
            print(
                f"  status c={clients:<3} facade p50 {median(ours):.2f} ms ({len(ours)} reads)   "
                f"BullMQ p50 {median(theirs):.2f} ms ({len(theirs)} reads)",
                flush=True,
            )
        node.stdin.write("quit\n")
        node.stdin.flush()
        node.wait(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
        loop.run_until_complete(mirror.redis.delete(*loop.run_until_complete(_keys(mirror))))
        loop.run_until_complete(mirror.close())
        loop.close()
    return report(peer, latency, status, jobs, seconds)


async def _keys(mirror: JobMirror) -> list[str]:
    return [k async for k in mirror.redis.scan_iter(match=f"{mirror.prefix}:*")] or ["-"]


def report(
    peer: dict[str, Any],
    lat: Latency,
    status: list[tuple[int, list[float], list[float]]],
    jobs: int,
    seconds: float,
) -> Section:
    def cells(xs: list[float]) -> str:
        return f"{median(xs):.2f} | {pct(xs, 99):.2f}"

    sub, pick = peer["submit_ms"], peer["pickup_ms"]
    lines = [
        f"machine: {machine()} · date: {today()} · BullMQ {peer['version']} on Node "
        f"{subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}",
        "",
        f"workload: {jobs} jobs one at a time on an idle queue/worker each side; status reads of "
        f"one completed job, closed loop, {seconds:g} s per cell, BullMQ's cell then ours at each "
        "concurrency (BullMQ: one Queue, one ioredis connection; ours: one `Queue` facade, "
        "redis-py's async pool). Same Redis server.",
        "",
        "| path | ours p50 ms | ours p99 ms | BullMQ p50 ms | BullMQ p99 ms "
        "| ratio p50 ours/BullMQ |",
        "|---|---|---|---|---|---|",
        f"| submit: POST /train → 202 vs `Queue.add` | {cells(lat.submit_ms)} | {cells(sub)} | "
        f"{median(lat.submit_ms) / median(sub):.0f}× |",
        f"| pickup: accepted → training activity running vs add → processor running | "
        f"{cells(lat.start_ms)} | {cells(pick)} | {median(lat.start_ms) / median(pick):.0f}× |",
    ]
    rows = [
        Row(
            "submit p50: POST /train vs BullMQ Queue.add, ms",
            f"{median(lat.submit_ms):.1f}",
            f"{median(sub):.2f}",
            f"{median(lat.submit_ms) / median(sub):.0f}×",
        ),
        Row(
            "pickup p50: accepted → training running vs BullMQ add → processor, ms",
            f"{median(lat.start_ms):.0f}",
            f"{median(pick):.2f}",
            f"{median(lat.start_ms) / median(pick):.0f}×",
        ),
    ]
    for clients, ours, theirs in status:
        ratio = median(ours) / median(theirs)
        lines.append(
            f"| status at {clients} caller(s): facade `get_job`+`get_state` vs "
            f"`getJob`+`getState` | {cells(ours)} | {cells(theirs)} | {ratio:.2f}× |"
        )
        rows.append(
            Row(
                f"status read p50 at {clients} caller(s): facade vs BullMQ getJob+getState, ms",
                f"{median(ours):.2f}",
                f"{median(theirs):.2f}",
                f"{ratio:.2f}×",
                "on par",
            )
        )
    return Section(
        "The peer the seed replaced: BullMQ on the same Redis",
        f"python bench/peer_bullmq.py --jobs {jobs} --seconds {seconds:g}",
        "\n".join(lines),
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(run(args.jobs, args.seconds).body)


if __name__ == "__main__":
    main()
