"""The `tenanttune` command: run the local stack, mint tokens, run the demo."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tenanttune.auth import LOCAL_SECRET_FILE, mint_token, with_local_secret
from tenanttune.settings import Settings, get_settings

app = typer.Typer(
    help="TenantTune: one fine-tuned LLM per tenant, as durable Temporal jobs.",
    no_args_is_help=True,
)
console = Console()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@app.command()
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="run in the background")] = False,
) -> None:
    """Start Temporal, Redis, the API and a worker (only what is not configured elsewhere),
    kept by supervisord: a program that dies is restarted, the others keep running."""
    from cli import stack

    settings = get_settings()
    if detach:
        try:
            info = stack.start_detached(settings)
        except stack.StackError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        verb = "was already running" if info.already_running else "is running in the background"
        console.print(f"the stack {verb} (supervisord pid {info.supervisor_pid})")
        console.print(f"  API        {info.api_url}")
        console.print(f"  Temporal   {info.temporal_address}   Web UI {info.temporal_ui_url}")
        console.print(f"  Redis      {stack.redact_url(info.redis_url)}")
        console.print(f"  logs       {info.log_dir}   (`tenanttune status`, `tenanttune down`)")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise typer.Exit(stack.run_foreground(settings))


@app.command()
def down() -> None:
    """Stop the stack started with `tenanttune up` (detached or not)."""
    from cli import stack

    if stack.stop(get_settings()):
        console.print("stack stopped")
    else:
        console.print("no stack was running")


@app.command()
def status() -> None:
    """Show each part of the stack and whether it answers."""
    _print_status(get_settings())


def _print_status(settings: Settings) -> None:
    from cli import stack

    for c in stack.status(settings):
        mark = "[green]✓[/green]" if c.healthy else "[red]✗[/red]"
        pid = f"pid {c.pid}" if c.pid else ("external" if not c.managed else "-")
        console.print(f"{mark} {c.name:<9} {c.address:<28} {pid:<12} {c.detail}")


@app.command()
def token(
    company: Annotated[str, typer.Option(help="the tenant (companyId) the token acts for")],
    admin: Annotated[bool, typer.Option(help="an admin token (queue control)")] = False,
    ttl: Annotated[int, typer.Option(help="seconds until it expires")] = 24 * 3600,
) -> None:
    """Mint a bearer token for the API (no JWT_SECRET set: the local stack's, in STATE_DIR)."""
    settings = get_settings()
    signing = with_local_secret(settings)
    if signing is not settings:
        typer.echo(
            "JWT_SECRET is unset: signed with the local stack's secret "
            f"({settings.state_dir / LOCAL_SECRET_FILE})",
            err=True,
        )
    print(mint_token(signing, company, admin=admin, ttl_s=ttl))


@app.command()
def demo(
    company: Annotated[str, typer.Option(help="sample tenant from examples/")] = "acme",
    epochs: Annotated[int, typer.Option(help="training epochs")] = 2,
    learning_rate: Annotated[float, typer.Option(help="learning rate")] = 2e-3,
    keep_running: Annotated[bool, typer.Option(help="leave the stack running afterwards")] = False,
    deploy: Annotated[bool, typer.Option(help="deploy the trained model and ask it")] = True,
    version: Annotated[str, typer.Option(help="tag of the deployed model")] = "demo",
) -> None:
    """Upload sample data, train through the API with live progress, deploy, ask the model."""
    from cli import stack

    settings = get_settings()
    base = f"http://{settings.api_host}:{settings.api_port}"
    started = False
    if not _api_up(base):
        console.print("starting the local stack (Temporal, Redis, API, worker) ...")
        stack.start_detached(settings)
        started = True
    try:
        headers = {"Authorization": f"Bearer {mint_token(with_local_secret(settings), company)}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            _upload_examples(http, company)
            body = {
                "epochs": epochs,
                "batchSize": 8,
                "learningRate": learning_rate,
                "loraRank": 16,
                "targetModules": [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
            }
            queued = _check(http.post(f"/api/ai/models/{company}/train", json=body))
            console.print(
                f"queued [bold]{queued['jobId']}[/bold]: {queued['datasetSize']} "
                f"examples, quality score {queued['qualityScore']}"
            )
            job = _follow(http, queued["jobId"])
            _fail_unless_completed(job)
            result = job["result"]
            metrics = result["metrics"]
            console.print(f"[green]trained[/green] model: [bold]{result['modelPath']}[/bold]")
            console.print(
                f"  train loss {metrics['trainLoss']:.3f}   eval loss "
                f"{metrics['firstEvalLoss']:.3f} → {metrics['evalLoss']:.3f}   "
                f"{metrics['tokensPerS']:.0f} tokens/s   {metrics['steps']} steps"
            )
            if not deploy:
                console.print(json.dumps(result, indent=2))
                return
            body = {"modelPath": result["modelPath"], "version": version}
            queued = _check(http.post(f"/api/ai/models/{company}/deploy", json=body))
            console.print(f"queued [bold]{queued['jobId']}[/bold] → {queued['modelName']}")
            job = _follow(http, queued["jobId"])
            _fail_unless_completed(job)
        deployed = job["result"]
        check = deployed["verification"]
        console.print(
            f"[green]deployed[/green] [bold]{deployed['modelName']}[/bold] "
            f"({deployed['target']}: {deployed['location']})"
        )
        console.print(f"  asked:  {check['prompt']}")
        console.print(f"  answer: {check['text'].strip()}")
        console.print(
            f"  {check['tokens']} tokens in {check['latencyS']:.2f} s "
            f"({check['tokensPerS']:.0f} tokens/s, llama.cpp)"
        )
    finally:
        if started and not keep_running:
            console.print("stopping the stack ...")
            stack.stop(settings)


def _fail_unless_completed(job: dict[str, Any]) -> None:
    if job["state"] != "completed":
        console.print(f"[red]job {job['jobId']} failed:[/red] {job.get('failedReason')}")
        raise typer.Exit(1)


def _api_up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        console.print(f"[red]{response.status_code}[/red] {response.text}")
        raise typer.Exit(1)
    return response.json()


def _upload_examples(http: httpx.Client, company: str) -> None:
    files = sorted((EXAMPLES / "tenants" / company).glob("*.jsonl"))
    if not files:
        console.print(f"[red]no sample data for {company} under {EXAMPLES}/tenants[/red]")
        raise typer.Exit(1)
    for path in files:
        with path.open("rb") as fh:
            report = _check(http.post(f"/api/ai/datasets/{company}", files={"file": fh}))
        console.print(f"uploaded {path.name}: {report['message']}")


def _follow(http: httpx.Client, job_id: str, timeout_s: float = 1800) -> dict[str, Any]:
    """Poll the job and draw its progress until it finishes."""
    deadline = time.monotonic() + timeout_s
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("waiting", total=100)
        while time.monotonic() < deadline:
            job: dict[str, Any] = _check(http.get(f"/api/ai/jobs/{job_id}"))
            bar.update(
                task,
                completed=job["progress"],
                description=_describe(job),
            )
            if job["state"] in ("completed", "failed"):
                return job
            time.sleep(0.5)
    console.print(f"[red]gave up waiting for {job_id} after {timeout_s:.0f} s[/red]")
    raise typer.Exit(1)


def _describe(job: dict[str, Any]) -> str:
    stage = job.get("stage") or ""
    return f"{job['state']} ({stage})" if job["state"] == "active" and stage else job["state"]


# --- Bull-style jobs and queues (talk to Temporal and Redis directly) ------------------------

jobs_app = typer.Typer(
    help="Inspect and control jobs (Bull's getJob, retry, ...).", no_args_is_help=True
)
queue_app = typer.Typer(
    help="Queue counts and control (Bull's pause, resume, clean).", no_args_is_help=True
)
cache_app = typer.Typer(help="The Redis mirror of job state.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(queue_app, name="queue")
app.add_typer(cache_app, name="cache")
QueueName = Annotated[str, typer.Argument(help="model-training or model-deployment")]


def _queue_for(job_id: str) -> Any:
    from jobs.bull import get_deployment_queue, get_training_queue
    from tenanttune.settings import TRAINING_QUEUE
    from tenanttune.vocab import queue_of

    queue = queue_of(job_id)
    if queue is None:
        console.print(f"[red]'{job_id}' is not a job id (train-… or deploy-…)[/red]")
        raise typer.Exit(2)
    return get_training_queue() if queue == TRAINING_QUEUE else get_deployment_queue()


def _named_queue(name: str) -> Any:
    from jobs.bull import get_deployment_queue, get_training_queue
    from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE

    if name == TRAINING_QUEUE:
        return get_training_queue()
    if name == DEPLOYMENT_QUEUE:
        return get_deployment_queue()
    console.print(f"[red]no queue '{name}': use {TRAINING_QUEUE} or {DEPLOYMENT_QUEUE}[/red]")
    raise typer.Exit(2)


def _run(coro: Any) -> Any:
    import asyncio

    from jobs.errors import JobError

    try:
        return asyncio.run(coro)
    except JobError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


@jobs_app.command("list")
def jobs_list(
    company: Annotated[str | None, typer.Option(help="only this tenant's jobs")] = None,
    state: Annotated[
        str | None, typer.Option(help="waiting, active, completed, failed, ...")
    ] = None,
    limit: Annotated[int, typer.Option(help="newest N")] = 20,
) -> None:
    """List jobs of both queues, newest first."""
    from jobs.bull import get_deployment_queue, get_training_queue

    async def collect() -> list[Any]:
        found = []
        for queue in (get_training_queue(), get_deployment_queue()):
            found += await queue.get_jobs(company, state, limit)
        return sorted(found, key=lambda j: j.timestamp or 0, reverse=True)[:limit]

    for job in _run(collect()):
        reason = f"  {job.failedReason}" if job.failedReason else ""
        console.print(
            f"{job.jobId:<40} {job.companyId:<12} {job.state:<10} "
            f"{job.progress:5.1f}%  {job.stage}{reason}"
        )


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    """Everything known about one job (JSON)."""
    from dataclasses import asdict

    info = _run(_queue_for(job_id).job_info(job_id))
    if info is None:
        console.print(f"[red]job '{job_id}' not found[/red]")
        raise typer.Exit(1)
    print(json.dumps(asdict(info), indent=2, default=str))


@jobs_app.command("watch")
def jobs_watch(job_id: str) -> None:
    """A live progress bar with step, loss and ETA until the job finishes."""
    import asyncio

    from jobs.read import job_from_temporal

    queue = _queue_for(job_id)
    settings = get_settings()

    async def watch() -> Any:
        client = await queue.jobs.client()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
        )
        started = time.monotonic()
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("waiting", total=100, eta="?")
            while True:
                info = await job_from_temporal(client, queue.name, job_id, settings)
                if info is None:
                    console.print(f"[red]job '{job_id}' not found[/red]")
                    raise typer.Exit(1)
                detail = info.detail or {}
                text = _describe(asdict_job(info))
                if detail.get("total"):
                    text += f" step {detail['step']}/{detail['total']} loss {detail.get('loss')}"
                elapsed = time.monotonic() - started
                eta = "?"
                if 0 < info.progress < 100:
                    eta = f"{elapsed * (100 - info.progress) / info.progress:.0f}s"
                bar.update(task, completed=info.progress, description=text, eta=eta)
                if info.state in ("completed", "failed"):
                    return info
                await asyncio.sleep(1)

    info = _run(watch())
    if info.state == "failed":
        console.print(f"[red]failed:[/red] {info.failedReason}")
        raise typer.Exit(1)
    console.print(json.dumps(info.result, indent=2, default=str))


def asdict_job(info: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)


@jobs_app.command("retry")
def jobs_retry(job_id: str) -> None:
    """Run a failed job again (same job id, attemptsMade grows)."""
    _run(_queue_for(job_id).retry(job_id))
    console.print(f"{job_id} queued again")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a waiting or running job."""
    _run(_queue_for(job_id).cancel(job_id))
    console.print(f"cancellation of {job_id} requested")


@queue_app.command("counts")
def queue_counts(queue: QueueName) -> None:
    """Jobs per state."""
    counts = _run(_named_queue(queue).get_job_counts())
    for state, n in counts.items():
        console.print(f"{state:<10} {n}")


@queue_app.command("pause")
def queue_pause(queue: QueueName) -> None:
    """New jobs stop starting (they show paused); running jobs finish."""
    _run(_named_queue(queue).pause())
    console.print(f"{queue} paused")


@queue_app.command("resume")
def queue_resume(queue: QueueName) -> None:
    """Paused jobs start again, oldest first."""
    _run(_named_queue(queue).resume())
    console.print(f"{queue} resumed")


@queue_app.command("clean")
def queue_clean(
    queue: QueueName,
    grace: Annotated[int, typer.Option(help="only jobs finished more than this many ms ago")] = 0,
    limit: Annotated[int, typer.Option(help="keep the newest N")] = 100,
    state: Annotated[str, typer.Option(help="completed or failed")] = "completed",
) -> None:
    """Forget old finished jobs in the mirror (Bull's clean)."""
    removed = _run(_named_queue(queue).clean(grace, limit, state))
    console.print(f"removed {len(removed)} {state} jobs from the {queue} mirror")


@cache_app.command("rebuild")
def cache_rebuild() -> None:
    """Rebuild the Redis mirror from Temporal's visibility (e.g. after a Redis flush)."""
    from jobs.service import job_service

    restored = _run(job_service(get_settings()).rebuild_cache())
    console.print(f"restored {restored} jobs into the mirror")


@app.command()
def replay(
    histories: Annotated[
        list[Path],
        typer.Argument(
            help="history JSON files (temporal "
            "workflow show --output json, or "
            "the SDK's fetch_history().to_json())"
        ),
    ],
) -> None:
    """Replay workflow histories against the current code; fails on non-determinism."""
    import asyncio

    from temporalio.client import WorkflowHistory
    from temporalio.worker import Replayer

    from workflows.deployment import DeploymentWorkflow
    from workflows.queue_control import QueueControlWorkflow
    from workflows.training import TrainingWorkflow

    replayer = Replayer(workflows=[TrainingWorkflow, DeploymentWorkflow, QueueControlWorkflow])
    failed = 0
    for path in histories:
        data = json.loads(path.read_text())
        start = data["events"][0].get("workflowExecutionStartedEventAttributes", {})
        history = WorkflowHistory.from_json(start.get("workflowId", path.stem), data)
        result = asyncio.run(replayer.replay_workflow(history, raise_on_replay_failure=False))
        if result.replay_failure is None:
            console.print(f"[green]✓[/green] {path}")
        else:
            failed += 1
            console.print(f"[red]✗[/red] {path}: {result.replay_failure}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def selftest(
    train: Annotated[bool, typer.Option(help="also run a one-step training job")] = True,
    timeout: Annotated[float, typer.Option(help="seconds the training job may take")] = 600,
) -> None:
    """Check Temporal, Redis, workers and the models dir, then train one step end to end."""
    import asyncio

    from cli.selftest import Check, run_selftest

    def report(check: Check) -> None:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.name:<28} {check.detail}", highlight=False, soft_wrap=True)
        if check.hint:
            console.print(f"    hint: {check.hint}", highlight=False, soft_wrap=True)

    checks = asyncio.run(run_selftest(get_settings(), report, train=train, timeout_s=timeout))
    failed = [c.name for c in checks if not c.ok]
    console.print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    raise typer.Exit(1 if failed else 0)


if __name__ == "__main__":
    app()
