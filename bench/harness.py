"""What every benchmark shares: a private stack, job helpers, statistics and the report shape.

A benchmark module exposes `run(...) -> Section` (and a `main()` for running it alone);
`bench/run_all.py` runs them all, prints one summary table and writes BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cli import stack  # noqa: E402
from tenanttune.auth import mint_token  # noqa: E402
from tenanttune.settings import Settings  # noqa: E402

BENCH_DIR = REPO / ".tenanttune" / "bench"  # cached inputs (bench base model, data)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
JOB_TIMEOUT_S = 900.0


# --- report shape ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the summary table: ours against the thing it is compared with."""

    what: str
    ours: str
    other: str
    ratio: str
    target: str = ""


@dataclass
class Section:
    """One benchmark's part of BENCHMARKS.md."""

    title: str
    command: str
    body: str  # markdown: workload, detailed table, notes
    rows: list[Row] = field(default_factory=list)


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu or 'unknown CPU'}), "
        f"Python {platform.python_version()}"
    )


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


# --- statistics ------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def pct(xs: Sequence[float], q: int) -> float:
    """The q-th percentile (inclusive method), or the only value."""
    if len(xs) < 2:
        return float(xs[0])
    return float(statistics.quantiles(xs, n=100, method="inclusive")[q - 1])


def span(xs: Sequence[float], fmt: str = ".2f") -> str:
    return f"{min(xs):{fmt}}–{max(xs):{fmt}}"


# --- processes -------------------------------------------------------------------------------


@dataclass
class Finished:
    wall_s: float
    peak_rss_mb: float
    stdout: str
    cpu_s: float = 0.0  # user + system CPU of the process


def run_measured(
    cmd: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> Finished:
    """Run a command to the end: wall time, and its own peak RSS and CPU (wait4), stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(
                f"{' '.join(cmd[:4])} … failed ({proc.returncode}):\n{err.read()[-3000:]}"
            )
        cpu = usage.ru_utime + usage.ru_stime
        return Finished(elapsed, usage.ru_maxrss / 1024, out.read(), cpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the private stack -----------------------------------------------------------------------


class PrivateStack:
    """Temporal dev server, API and worker on free ports, with their own dirs under a temp root.

    Redis is the machine's (`BENCH_REDIS_URL`, database 12 by default). Use as a context
    manager; everything it started is stopped and its files removed on exit.
    """

    def __init__(self, tenants: Sequence[str] = ("acme",)) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tt-bench-"))
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            jwt_secret=secrets.token_urlsafe(32),  # none is built in; the stack gets this one
            state_dir=self.root / "state",
            data_dir=self.root / "data",
            models_dir=self.root / "models",
            temporal_address=f"127.0.0.1:{free_port()}",
            temporal_ui_port=free_port(),
            api_port=free_port(),
            redis_url=REDIS_URL,
            # A prefix of its own: runs never see each other's jobs, and close() removes them.
            redis_prefix=f"bull-bench-{uuid.uuid4().hex[:8]}",
            # The per-token request limit would answer the load generators with 429s.
            rate_limit_per_minute=0,
        )
        self.base_url = f"http://127.0.0.1:{self.settings.api_port}"
        self._tenants = list(tenants)
        self._clients: list[httpx.Client] = []

    def __enter__(self) -> PrivateStack:
        for company in self._tenants:
            self.seed_tenant(company)
        try:
            t0 = time.perf_counter()
            stack.start_detached(self.settings)
            self.start_s = time.perf_counter() - t0
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        with contextlib.suppress(Exception):
            stack.stop(self.settings)
        with contextlib.suppress(Exception):
            r = redis.Redis.from_url(self.settings.redis_url)
            for key in r.scan_iter(match=f"{self.settings.redis_prefix}:*", count=1000):
                r.delete(key)
            r.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def seed_tenant(self, company: str, source: str = "acme") -> None:
        """Copy a sample tenant's raw data (examples/tenants/<source>) to `company`'s dir."""
        tenant = self.settings.tenant_data_dir(company)
        tenant.mkdir(parents=True, exist_ok=True)
        for f in (REPO / "examples" / "tenants" / source).glob("*.jsonl"):
            shutil.copy(f, tenant / f.name)

    def pids(self) -> dict[str, int]:
        """The processes this stack started (temporal, api, worker; Redis is the machine's)."""
        return {
            c.name: c.pid
            for c in stack.status(self.settings)
            if c.pid and c.managed and c.name != "supervisor"
        }

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each of the stack's processes."""
        return {name: process_cpu_s(pid) for name, pid in self.pids().items()}

    def token(self, company: str) -> str:
        return mint_token(self.settings, company)

    def headers(self, company: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(company)}"}

    def http(self, company: str) -> httpx.Client:
        """A keep-alive client with the tenant's token; closed with the stack."""
        client = httpx.Client(base_url=self.base_url, timeout=60, headers=self.headers(company))
        self._clients.append(client)
        return client


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def submit(http: httpx.Client, company: str, body: dict[str, Any]) -> str:
    resp = http.post(f"/api/ai/models/{company}/train", json=body).raise_for_status()
    return str(resp.json()["jobId"])


def wait_finished(
    http: httpx.Client,
    job_ids: Sequence[str],
    poll_s: float = 0.05,
    timeout_s: float = JOB_TIMEOUT_S,
) -> dict[str, dict[str, Any]]:
    """Poll GET /api/ai/jobs/<id> until every job is completed; the last answer of each.

    A failed job ends the benchmark with its reason.
    """
    deadline = time.monotonic() + timeout_s
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(job_ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs not finished after {timeout_s:.0f} s: {list(job_ids)}")
        for job_id in job_ids:
            if job_id in done:
                continue
            job = http.get(f"/api/ai/jobs/{job_id}").raise_for_status().json()
            if job["state"] == "failed":
                raise SystemExit(f"job {job_id} failed: {job['failedReason']}")
            if job["state"] == "completed":
                done[job_id] = job
        if len(done) < len(job_ids):
            time.sleep(poll_s)
    return done


@contextlib.contextmanager
def stack_or(existing: PrivateStack | None, tenants: Sequence[str]) -> Iterator[PrivateStack]:
    """The stack the caller shares, with these tenants seeded, or a new one for this run."""
    if existing is not None:
        for company in tenants:
            existing.seed_tenant(company)
        yield existing
        return
    with PrivateStack(tenants) as own:
        yield own
