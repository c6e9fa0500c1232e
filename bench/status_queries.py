"""Status queries: GET /api/ai/jobs/<id> from the Redis mirror vs from Temporal describe, and
how the tenant's job list grows with the number of jobs in the mirror.

On a private stack it trains two tiny jobs for one tenant:
  redis:    a normal job, whose finished state stays in the Bull-style Redis mirror
  temporal: a job sent with removeOnComplete, whose mirror entry goes at completion, so the same
            endpoint answers from Temporal (describe + result)
Then, for each concurrency level, it runs a closed loop of N clients against each path for a fixed
time, alternating the paths cell by cell, and prints requests/s, p50/p99 latency and the ratios.
Last, it fills the mirror with 100, 1,000 and 10,000 jobs of another tenant (written straight
into Redis in the mirror's layout, finished or waiting) and times GET /api/ai/models/<id>/jobs.
Run: `python bench/status_queries.py [--seconds 5] [--clients 1,8,32] [--sizes 100,1000,10000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from dataclasses import dataclass

import httpx
from harness import (
    PrivateStack,
    Row,
    Section,
    machine,
    median,
    pct,
    stack_or,
    submit,
    today,
    wait_finished,
)

from tenanttune.mirror import JobMirror
from tenanttune.settings import TRAINING_QUEUE
from tenanttune.vocab import JobState

COMPANY = "status"
HP: dict[str, object] = {"epochs": 1, "batchSize": 8, "learningRate": 0.002}
PATHS = ("redis", "temporal")


@dataclass
class Cell:
    path: str
    clients: int
    latencies_s: list[float]
    elapsed_s: float
    client_cpu_s: float  # CPU this load generator itself used: a busy client skews the cell

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000

    @property
    def p99_ms(self) -> float:
        return pct(self.latencies_s, 99) * 1000


async def closed_loop(
    pool: list[httpx.AsyncClient], url: str, clients: int, seconds: float, check: bytes = b""
) -> tuple[list[float], float, float]:
    """`clients` workers, each sending its next GET when one answers: latencies, elapsed, CPU."""

    async def get(client: httpx.AsyncClient) -> float:
        t0 = time.perf_counter()
        resp = await client.get(url)
        latency = time.perf_counter() - t0
        if resp.status_code != 200:
            raise SystemExit(f"{url} c={clients}: HTTP {resp.status_code}: {resp.text[:300]}")
        if check and check not in resp.content:
            raise SystemExit(f"{url} c={clients}: unexpected answer: {resp.text[:300]}")
        return latency

    workers = pool[:clients]
    # Warm-up, untimed: every worker's connection is open and the path touched once.
    await asyncio.gather(*(get(client) for client in workers))
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> list[float]:
        out: list[float] = []
        while time.perf_counter() < deadline:
            out.append(await get(client))
        return out

    t0, cpu0 = time.perf_counter(), time.process_time()
    per_worker = await asyncio.gather(*(worker(client) for client in workers))
    return [x for w in per_worker for x in w], time.perf_counter() - t0, time.process_time() - cpu0


async def fill_mirror(mirror: JobMirror, company: str, state: JobState, start: int, n: int) -> None:
    """Jobs `start`..`n-1` of a tenant, written the way the status activity writes them."""
    now = int(time.time() * 1000)

    async def one(i: int) -> None:
        job_id = f"train-{company}-{uuid.UUID(int=i).hex[-16:]}"
        fields: dict[str, object] = {
            "name": "train",
            "companyId": company,
            "data": {"companyId": company, "hyperparameters": HP},
            "opts": {},
            "timestamp": now - (n - i) * 1000,
            "progress": 100 if state == JobState.COMPLETED else 0,
            "attemptsMade": 1 if state == JobState.COMPLETED else 0,
        }
        if state == JobState.COMPLETED:
            fields |= {
                "processedOn": now - (n - i) * 1000 + 10,
                "finishedOn": now - (n - i) * 1000 + 500,
                "returnvalue": {"model_path": f"/models/{company}/{job_id}", "metrics": {}},
            }
        await mirror.move(
            TRAINING_QUEUE, job_id, state, fields, company_id=company, score=now - (n - i) * 1000
        )

    for chunk in range(start, n, 32):  # within the client's connection pool
        await asyncio.gather(*(one(i) for i in range(chunk, min(chunk + 32, n))))


async def measure(
    st: PrivateStack, jobs: dict[str, str], levels: list[int], seconds: float, sizes: list[int]
) -> tuple[list[Cell], list[tuple[str, int, list[float]]]]:
    # One AsyncClient (one keep-alive connection) per worker: a single shared client's
    # connection pool costs so much CPU at 32 concurrent requests that it, not the API, is
    # what gets measured (about a quarter of the throughput on a 2-core machine).
    cells: list[Cell] = []
    growth: list[tuple[str, int, list[float]]] = []
    async with contextlib.AsyncExitStack() as stack_:
        pool = [
            await stack_.enter_async_context(
                httpx.AsyncClient(base_url=st.base_url, timeout=30, headers=st.headers(COMPANY))
            )
            for _ in range(max(levels))
        ]
        for clients in levels:
            for path in PATHS:  # alternate cell by cell: same machine conditions for both
                marker = f'"source":"{path}"'.encode()
                lat, elapsed, cpu = await closed_loop(
                    pool, f"/api/ai/jobs/{jobs[path]}", clients, seconds, marker
                )
                cell = Cell(path, clients, lat, elapsed, cpu)
                cells.append(cell)
                print(
                    f"  {path:8} c={clients:<3} {cell.requests:6d} req  {cell.rps:8.1f} req/s  "
                    f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                    f"client CPU {100 * cell.client_cpu_s / cell.elapsed_s:3.0f} %",
                    flush=True,
                )
        s = st.settings
        mirror = JobMirror.from_url(s.redis_url, s.redis_prefix)
        try:
            for state in (JobState.COMPLETED, JobState.WAITING):
                company = f"many-{state.value}"
                async with httpx.AsyncClient(
                    base_url=st.base_url, timeout=30, headers=st.headers(company)
                ) as client:
                    have = 0
                    for n in sizes:
                        await fill_mirror(mirror, company, state, have, n)
                        have = n
                        lat, _, _ = await closed_loop(
                            [client], f"/api/ai/models/{company}/jobs", 1, seconds / 2
                        )
                        growth.append((state.value, n, lat))
                        print(
                            f"  list {state.value:9} {n:6d} jobs  p50 {median(lat) * 1000:7.2f} "
                            f"ms  p99 {pct(lat, 99) * 1000:7.2f} ms",
                            flush=True,
                        )
        finally:
            await mirror.close()
    return cells, growth


def run(
    seconds: float = 3.0,
    levels: tuple[int, ...] = (1, 8, 32),
    sizes: tuple[int, ...] = (100, 1000, 10000),
    shared: PrivateStack | None = None,
) -> Section:
    with stack_or(shared, [COMPANY]) as st:
        http = st.http(COMPANY)
        jobs = {
            "redis": submit(http, COMPANY, HP),
            "temporal": submit(http, COMPANY, {**HP, "removeOnComplete": True}),
        }
        finished = wait_finished(http, list(jobs.values()))
        sizes_b: dict[str, int] = {}
        for path, job_id in jobs.items():
            resp = http.get(f"/api/ai/jobs/{job_id}").raise_for_status()
            source = resp.json()["source"]
            if source != path or finished[job_id]["source"] != path:
                raise SystemExit(f"job {job_id} is answered from {source!r}, not {path!r}")
            sizes_b[path] = len(resp.content)
        cells, growth = asyncio.run(measure(st, jobs, list(levels), seconds, list(sizes)))
    return report(cells, growth, seconds, levels, sizes, sizes_b)


def report(
    cells: list[Cell],
    growth: list[tuple[str, int, list[float]]],
    seconds: float,
    levels: tuple[int, ...],
    sizes: tuple[int, ...],
    sizes_b: dict[str, int],
) -> Section:
    lines = [
        f"machine: {machine()} · date: {today()}",
        "",
        f"workload: two finished tiny training jobs of one tenant ({json.dumps(HP)}); one "
        "answered from the mirror, one sent with `removeOnComplete: true` so the same route "
        "answers from Temporal (describe, then the result from history); every answer checked "
        f"for 200 and its `source`. Closed loop on 127.0.0.1, {seconds:g} s per cell after a "
        "warm-up, one keep-alive httpx client per simulated client, cells alternate redis / "
        f"temporal at each concurrency; one uvicorn process. Answer bytes: redis "
        f"{sizes_b['redis']}, temporal {sizes_b['temporal']}.",
        "",
        "| path | clients | requests | req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    by_key = {(c.path, c.clients): c for c in cells}
    rows: list[Row] = []
    for clients in levels:
        r, t = by_key[("redis", clients)], by_key[("temporal", clients)]
        for cell in (r, t):
            lines.append(
                f"| {cell.path} | {clients} | {cell.requests} | {cell.rps:.1f} | "
                f"{cell.p50_ms:.2f} | {cell.p99_ms:.2f} |"
            )
        lines.append(
            f"| **ratio** | {clients} | | **{r.rps / t.rps:.2f}× redis/temporal** | "
            f"**{t.p50_ms / r.p50_ms:.2f}× temporal/redis** | {t.p99_ms / r.p99_ms:.2f}× |"
        )
        rows.append(
            Row(
                f"GET /jobs/{{id}} at {clients} client(s): req/s, p50 ms",
                f"{r.rps:.0f} req/s, {r.p50_ms:.1f} ms (mirror)",
                f"{t.rps:.0f} req/s, {t.p50_ms:.1f} ms (Temporal describe)",
                f"{r.rps / t.rps:.2f}× req/s",
            )
        )
    lines += [
        "",
        f"The tenant's job list, `GET /api/ai/models/<id>/jobs` (default limit 50), one client, "
        f"{seconds / 2:g} s per size; the tenant's jobs written straight into the mirror (finished "
        "jobs in `completed`, or a backlog in `wait`), nothing else in the queue:",
        "",
        "| jobs in the mirror | state | requests | p50 ms | p99 ms | p50 vs the smallest |",
        "|---|---|---|---|---|---|",
    ]
    for state in ("completed", "waiting"):
        series = [(n, lat) for s, n, lat in growth if s == state]
        if not series:
            continue
        base = median(series[0][1])
        for n, lat in series:
            lines.append(
                f"| {n:,} | {state} | {len(lat)} | {median(lat) * 1000:.2f} | "
                f"{pct(lat, 99) * 1000:.2f} | {median(lat) / base:.2f}× |"
            )
        first, last = series[0], series[-1]
        rows.append(
            Row(
                f"job list p50, {first[0]:,} → {last[0]:,} {state} jobs in the mirror",
                f"{median(first[1]) * 1000:.1f} → {median(last[1]) * 1000:.1f} ms",
                "",
                f"{median(last[1]) / median(first[1]):.2f}×",
            )
        )
    return Section(
        "Status queries: Redis mirror vs Temporal, and the job list",
        "python bench/status_queries.py "
        f"--seconds {seconds:g} --clients {','.join(map(str, levels))} "
        f"--sizes {','.join(map(str, sizes))}",
        "\n".join(lines),
        rows,
    )


def parse_ints(text: str) -> tuple[int, ...]:
    levels = tuple(int(x) for x in text.split(",") if x.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("comma-separated positive integers")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each cell")
    parser.add_argument("--clients", type=parse_ints, default=(1, 8, 32))
    parser.add_argument("--sizes", type=parse_ints, default=(100, 1000, 10000))
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    print(run(args.seconds, args.clients, args.sizes).body)


if __name__ == "__main__":
    main()
