"""Redis gone for the whole length of a job: the job completes, status answers from Temporal,
and `tenanttune cache rebuild` restores the mirror once Redis is back."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import REPO
from tests.e2e.faults.conftest import Cluster, free_port, seed_tenant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # minutes of real work on 2 busy cores


def start_redis(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    assert server, "redis-server is needed for this test (Debian package redis-server)"
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis(port=port).ping():
                return proc
        except redis.ConnectionError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)


@pytest.fixture
def own_redis(cluster: Cluster) -> Iterator[int]:
    port = free_port()
    proc = start_redis(port)
    cluster.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    yield port
    proc.kill()
    proc.wait()


def test_job_completes_with_redis_down_and_the_mirror_is_rebuilt(
    cluster: Cluster, own_redis: int
) -> None:
    seed_tenant(cluster.settings, "norediss", lines=80)
    cluster.start("api")
    cluster.start("worker")
    import httpx

    body = {"epochs": 2, "batchSize": 8, "learningRate": 0.003}
    url = f"{cluster.api_url}/api/ai/models/norediss/train"
    r = httpx.post(url, json=body, headers=cluster.headers("norediss"), timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobId"]
    # Redis goes away right after the job is accepted (before it runs) and stays away until
    # it has finished.
    subprocess.run(["redis-cli", "-p", str(own_redis), "shutdown", "nosave"], check=False)
    # Meanwhile new work is refused (the rate limiter fails closed for writes), reads answer.
    refused = httpx.post(url, json=body, headers=cluster.headers("norediss"), timeout=60)
    assert refused.status_code == 503 and "rate limiter" in refused.json()["detail"]
    assert cluster.job("norediss", job_id)["source"] == "temporal"
    final = cluster.wait_for("norediss", job_id)
    assert final["state"] == "completed" and final["source"] == "temporal"
    # Mirror writes time out meanwhile; none of them held the heartbeat up.
    (only,) = cluster.attempts(job_id, "train_model")
    assert (only.attempt, only.outcome) == (1, "completed"), "Redis down cost a training attempt"

    proc = start_redis(own_redis)  # back, empty
    try:
        assert cluster.job("norediss", job_id)["source"] == "temporal"
        rebuilt = subprocess.run(
            [sys.executable, "-m", "cli.main", "cache", "rebuild"],
            cwd=REPO,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        again = cluster.job("norediss", job_id)
        assert again["source"] == "redis" and again["state"] == "completed"
        assert again["result"]["modelPath"] == final["result"]["modelPath"]  # type: ignore[index]
    finally:
        proc.kill()
        proc.wait()
