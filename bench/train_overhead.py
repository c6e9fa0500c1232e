"""Orchestration overhead: one training job through the API vs the bare training command.

Starts a private embedded stack (own ports and dirs), then alternates N runs of each:
  job:  POST /api/ai/models/<tenant>/train, poll GET /api/ai/jobs/<id> until completed
  bare: python -m training.train on the same exported split, base model and hyperparameters
and prints median wall times and the ratio. Run: `python bench/train_overhead.py [--runs 5]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tenanttune import stack  # noqa: E402
from tenanttune.auth import mint_token  # noqa: E402
from tenanttune.settings import Settings  # noqa: E402

HP = {"epochs": 2, "batchSize": 8, "learningRate": 0.002}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(http: httpx.Client, company: str) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    job_id = (
        http.post(f"/api/ai/models/{company}/train", json=HP).raise_for_status().json()["jobId"]
    )
    while True:
        job = http.get(f"/api/ai/jobs/{job_id}").raise_for_status().json()
        if job["state"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    if job["state"] != "completed":
        raise SystemExit(f"job failed: {job['failedReason']}")
    return elapsed, job


def run_bare(settings: Settings, company: str, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "training.train",
        "--base-model",
        str(settings.tiny_base_dir),
        "--train-file",
        str(settings.data_dir / f"{company}-training.jsonl"),
        "--eval-file",
        str(settings.data_dir / f"{company}-validation.jsonl"),
        "--output-dir",
        str(out),
        "--epochs",
        str(HP["epochs"]),
        "--batch-size",
        str(HP["batchSize"]),
        "--learning-rate",
        str(HP["learningRate"]),
        "--save-steps",
        str(settings.train_save_steps),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + "-checkpoints"), ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--company", default="acme")
    args = parser.parse_args()

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
    stack.start_detached(settings)
    jobs, bares = [], []
    try:
        token = mint_token(settings, args.company)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.api_port}",
            timeout=60,
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            run_job(http, args.company)  # warm-up: builds the tiny base, exports the data
            for i in range(args.runs):
                elapsed, job = run_job(http, args.company)
                jobs.append(elapsed)
                bares.append(run_bare(settings, args.company, root / f"bare-{i}"))
                print(f"run {i + 1}: job {elapsed:6.2f} s   bare {bares[-1]:6.2f} s", flush=True)
        steps = job["result"]["metrics"]["steps"]  # type: ignore[index]
    finally:
        stack.stop(settings)
        shutil.rmtree(root, ignore_errors=True)
    mj, mb = statistics.median(jobs), statistics.median(bares)
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"workload: tiny Mistral, tenant {args.company}, {HP}, {steps} optimizer steps")
    print("| path | runs | median s | min–max s |")
    print("|---|---|---|---|")
    print(
        f"| job through API → Temporal → worker → subprocess | {len(jobs)} | {mj:.2f} | "
        f"{min(jobs):.2f}–{max(jobs):.2f} |"
    )
    print(
        f"| bare `python -m training.train` | {len(bares)} | {mb:.2f} | "
        f"{min(bares):.2f}–{max(bares):.2f} |"
    )
    print(f"| **ratio job / bare** | | **{mj / mb:.3f}** | |")


if __name__ == "__main__":
    main()
