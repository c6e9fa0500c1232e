"""Status queries: GET /api/ai/jobs/<id> served from the Redis mirror vs from Temporal describe.

Starts a private embedded stack (own ports and dirs) and trains two tiny jobs for one tenant:
  redis:    a normal job, whose finished state stays in the Bull-style Redis mirror
  temporal: a job sent with removeOnComplete, whose mirror entry goes at completion, so the same
            endpoint answers from Temporal (describe + result)
Then, for each concurrency level, it runs a closed loop of N clients against each path for a fixed
time, alternating the paths cell by cell, and prints requests/s, p50/p99 latency and the ratios.
Run: `python bench/status_queries.py [--seconds 5] [--clients 1,8,32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tenanttune import stack  # noqa: E402
from tenanttune.auth import mint_token  # noqa: E402
from tenanttune.settings import Settings  # noqa: E402

HP: dict[str, object] = {"epochs": 1, "batchSize": 8, "learningRate": 0.002}
PATHS = ("redis", "temporal")
JOB_TIMEOUT_S = 600.0


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
        if len(self.latencies_s) < 2:
            return self.latencies_s[0] * 1000
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[98] * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_job(http: httpx.Client, company: str, extra: dict[str, object]) -> str:
    body = {**HP, **extra}
    resp = http.post(f"/api/ai/models/{company}/train", json=body).raise_for_status()
    return str(resp.json()["jobId"])


def wait_completed(http: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, object]]:
    """Poll until every job is completed; the last answer of each."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    done: dict[str, dict[str, object]] = {}
    while len(done) < len(job_ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs not finished after {JOB_TIMEOUT_S:.0f} s: {job_ids}")
        for job_id in job_ids:
            if job_id in done:
                continue
            job = http.get(f"/api/ai/jobs/{job_id}").raise_for_status().json()
            if job["state"] == "failed":
                raise SystemExit(f"job {job_id} failed: {job['failedReason']}")
            if job["state"] == "completed":
                done[job_id] = job
        time.sleep(0.1)
    return done


async def run_cell(
    pool: list[httpx.AsyncClient], path: str, job_id: str, clients: int, seconds: float
) -> Cell:
    """A closed loop of `clients` workers, each sending its next request when one answers."""
    url = f"/api/ai/jobs/{job_id}"
    marker = f'"source":"{path}"'.encode()

    async def get(client: httpx.AsyncClient) -> float:
        t0 = time.perf_counter()
        resp = await client.get(url)
        latency = time.perf_counter() - t0
        if resp.status_code != 200:
            raise SystemExit(f"{path} c={clients}: HTTP {resp.status_code}: {resp.text[:300]}")
        if marker not in resp.content:
            raise SystemExit(f"{path} c={clients}: answer not from {path}: {resp.text[:300]}")
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
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return Cell(path, clients, [x for w in per_worker for x in w], elapsed, cpu)


async def measure(
    base_url: str, token: str, jobs: dict[str, str], levels: list[int], seconds: float
) -> list[Cell]:
    # One AsyncClient (one keep-alive connection) per worker: a single shared client's
    # connection pool costs so much CPU at 32 concurrent requests that it, not the API, is
    # what gets measured (about a quarter of the throughput on a 2-core machine).
    headers = {"Authorization": f"Bearer {token}"}
    async with contextlib.AsyncExitStack() as stack_:
        pool = [
            await stack_.enter_async_context(
                httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers)
            )
            for _ in range(max(levels))
        ]
        cells: list[Cell] = []
        for clients in levels:
            for path in PATHS:  # alternate cell by cell: same machine conditions for both
                cell = await run_cell(pool, path, jobs[path], clients, seconds)
                cells.append(cell)
                print(
                    f"{path:8} c={clients:<3} {cell.requests:6d} req  {cell.rps:8.1f} req/s  "
                    f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
                    f"client CPU {100 * cell.client_cpu_s / cell.elapsed_s:3.0f} %",
                    flush=True,
                )
    return cells


def print_table(cells: list[Cell]) -> None:
    print("| path | clients | requests | req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    by_key = {(c.path, c.clients): c for c in cells}
    for clients in dict.fromkeys(c.clients for c in cells):
        r, t = by_key[("redis", clients)], by_key[("temporal", clients)]
        for cell in (r, t):
            print(
                f"| {cell.path} | {clients} | {cell.requests} | {cell.rps:.1f} | "
                f"{cell.p50_ms:.2f} | {cell.p99_ms:.2f} |"
            )
        print(
            f"| **ratio** | {clients} | | **{r.rps / t.rps:.2f}× redis/temporal** | "
            f"**{t.p50_ms / r.p50_ms:.2f}× temporal/redis** | {t.p99_ms / r.p99_ms:.2f}× |"
        )


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("clients: comma-separated positive integers")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each cell")
    parser.add_argument(
        "--clients", type=parse_levels, default=[1, 8, 32], help="concurrency levels, e.g. 1,8,32"
    )
    parser.add_argument("--company", default="acme")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    root = Path(tempfile.mkdtemp(prefix="tt-bench-"))
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        state_dir=root / "state",
        data_dir=root / "data",
        models_dir=root / "models",
        temporal_address=f"127.0.0.1:{free_port()}",
        temporal_ui_port=free_port(),
        api_port=free_port(),
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    )
    tenant = settings.tenant_data_dir(args.company)
    tenant.mkdir(parents=True)
    for f in (REPO / "examples" / "tenants" / args.company).glob("*.jsonl"):
        shutil.copy(f, tenant / f.name)
    try:
        stack.start_detached(settings)
        token = mint_token(settings, args.company)
        base_url = f"http://127.0.0.1:{settings.api_port}"
        with httpx.Client(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            t0 = time.perf_counter()
            jobs = {
                "redis": start_job(http, args.company, {}),
                "temporal": start_job(http, args.company, {"removeOnComplete": True}),
            }
            finished = wait_completed(http, list(jobs.values()))
            print(f"both jobs completed in {time.perf_counter() - t0:.1f} s", flush=True)
            sizes: dict[str, int] = {}
            for path, job_id in jobs.items():
                resp = http.get(f"/api/ai/jobs/{job_id}").raise_for_status()
                source = resp.json()["source"]
                if source != path or finished[job_id]["source"] != path:
                    raise SystemExit(f"job {job_id} is answered from {source!r}, not {path!r}")
                sizes[path] = len(resp.content)
        cells = asyncio.run(measure(base_url, token, jobs, args.clients, args.seconds))
    finally:
        stack.stop(settings)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"workload: tenant {args.company}, jobs trained with {HP}; closed loop on 127.0.0.1, "
        f"{args.seconds:g} s per cell, one httpx.AsyncClient (keep-alive connection) per client; "
        f"answer bytes redis {sizes['redis']}, temporal {sizes['temporal']}"
    )
    print_table(cells)


if __name__ == "__main__":
    main()
