"""Faults around side effects: a worker killed right after it published a model, and a disk
that fills up during conversion. Real processes, a real SIGKILL, a real (tmpfs) full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.faults.conftest import Cluster, seed_tenant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # minutes of real work on 2 busy cores
QUICK = {
    "epochs": 1,
    "batchSize": 8,
    "learningRate": 0.003,
    "loraRank": 8,
    "targetModules": ["q_proj", "v_proj"],
}


def train(cluster: Cluster, company: str) -> str:
    """A short real training job; the trained model's path."""
    r = httpx.post(
        f"{cluster.api_url}/api/ai/models/{company}/train",
        json=QUICK,
        headers=cluster.headers(company),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job = cluster.wait_for(company, r.json()["jobId"])
    assert job["state"] == "completed", job
    return str(job["result"]["modelPath"])  # type: ignore[index]


def deploy(cluster: Cluster, company: str, model_path: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{cluster.api_url}/api/ai/models/{company}/deploy",
        json={"modelPath": model_path, **body},
        headers=cluster.headers(company),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def test_worker_killed_after_publishing_does_not_publish_twice(cluster: Cluster) -> None:
    seed_tenant(cluster.settings, "pub", lines=40)
    cluster.start("api")
    # This worker kills itself (SIGKILL) right after the publish, before the activity completes.
    first = cluster.start("worker", TENANTTUNE_FAILPOINTS="deploy_model.published")
    model_path = train(cluster, "pub")
    accepted = deploy(cluster, "pub", model_path, version="1.0")

    first.wait(timeout=240)  # died at the failpoint
    assert first.returncode == -9, (cluster.root / "worker.log").read_text()[-2000:]
    cluster.procs.pop("worker")
    name, _, tag = accepted["modelName"].partition(":")
    published = cluster.settings.registry_dir / name / tag
    assert (published / "metadata.json").exists(), "the publish had happened before the kill"
    meta_before = (published / "metadata.json").read_text()
    inode_before = (published / "model.gguf").stat().st_ino
    assert cluster.job("pub", accepted["jobId"])["state"] == "active"

    # A new worker takes the deploy step over after its heartbeat timeout.
    cluster.start("worker")
    job = cluster.wait_for("pub", accepted["jobId"])
    assert job["state"] == "completed", job
    assert job["result"]["verification"]["text"]  # type: ignore[index]
    # The retry recognised the finished publish: same files, nothing moved aside or re-copied.
    assert (published / "metadata.json").read_text() == meta_before
    assert (published / "model.gguf").stat().st_ino == inode_before
    assert sorted(p.name for p in published.parent.iterdir()) == [tag], "no copy, no temp dir"
    assert "already published by this job" in (cluster.root / "worker.log").read_text()
    # The killed attempt was the first; the second, on the new worker, finished the step.
    (publish,) = cluster.attempts(accepted["jobId"], "deploy_model")
    assert (publish.attempt, publish.outcome, publish.after) == (
        2,
        "completed",
        "heartbeat timeout",
    )
    assert publish.worker == cluster.identity("worker")
    (convert,) = cluster.attempts(accepted["jobId"], "convert_to_gguf")
    assert convert.attempt == 1, "the conversion before the kill took one attempt"


@pytest.fixture
def small_models_disk(cluster: Cluster) -> Iterator[Path]:
    """The models dir on a 96 MB tmpfs: a disk that really fills up."""
    models = cluster.settings.models_dir
    models.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(models)],
        capture_output=True,
        text=True,
    )
    # No skip: a machine that refuses the mount must not pass this test unproven.
    assert mounted.returncode == 0, (
        f"mounting a tmpfs (needs root, as CI has here) failed: {mounted.stderr.strip()}"
    )
    try:
        yield models
    finally:
        subprocess.run(["umount", "-l", str(models)], check=False)


def test_disk_full_during_conversion_fails_clearly_and_publishes_nothing(
    cluster: Cluster, small_models_disk: Path
) -> None:
    seed_tenant(cluster.settings, "full", lines=40)
    cluster.start("api")
    cluster.start("worker")
    model_path = cluster.settings.models_dir / "full" / train(cluster, "full")
    files_before = sorted(p.relative_to(model_path) for p in model_path.rglob("*"))

    # Leave 256 KB: the trained adapter fits, its merged weights and GGUF will not.
    filler = small_models_disk / "filler"
    free = shutil.disk_usage(small_models_disk).free
    with filler.open("wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, free - 256 * 1024)
    accepted = deploy(cluster, "full", str(model_path), version="1.0", attempts=2)
    job = cluster.wait_for("full", accepted["jobId"])

    assert job["state"] == "failed", job
    reason = str(job["failedReason"])
    assert "no space left on device" in reason and "free space there" in reason, reason
    assert job["attemptsMade"] == 1  # one job run; its conversion step tried twice
    (convert,) = cluster.attempts(accepted["jobId"], "convert_to_gguf")
    assert (convert.attempt, convert.outcome) == (2, "failed"), convert
    assert "no space left on device" in convert.after, "the first attempt failed the same way"
    # Nothing half-written: the model dir is as training left it, nothing was published.
    assert sorted(p.relative_to(model_path) for p in model_path.rglob("*")) == files_before
    assert not cluster.settings.registry_dir.exists() or not any(
        cluster.settings.registry_dir.iterdir()
    )

    # Space freed: the next job runs on the same worker and deploys.
    filler.unlink()
    accepted = deploy(cluster, "full", str(model_path), version="1.1")
    job = cluster.wait_for("full", accepted["jobId"])
    assert job["state"] == "completed", job
    gguf = cluster.settings.models_dir / "full" / job["result"]["ggufPath"]  # type: ignore[index]
    assert gguf.exists()
