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

from tenanttune.auth import mint_token
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
    """Start Temporal, Redis, the API and a worker (only what is not configured elsewhere)."""
    from tenanttune import stack

    settings = get_settings()
    if detach:
        try:
            info = stack.start_detached(settings)
        except stack.StackError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        verb = "was already running" if info.already_running else "is running in the background"
        console.print(f"the stack {verb} (supervisor pid {info.supervisor_pid})")
        console.print(f"  API        {info.api_url}")
        console.print(f"  Temporal   {info.temporal_address}   Web UI {info.temporal_ui_url}")
        console.print(f"  Redis      {info.redis_url}")
        console.print(f"  logs       {info.log_dir}")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise typer.Exit(stack.run_foreground(settings))


@app.command()
def down() -> None:
    """Stop a stack started with `tenanttune up --detach`."""
    from tenanttune import stack

    if stack.stop(get_settings()):
        console.print("stack stopped")
    else:
        console.print("no detached stack was running")


@app.command()
def status() -> None:
    """Show each part of the stack and whether it answers."""
    _print_status(get_settings())


def _print_status(settings: Settings) -> None:
    from tenanttune import stack

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
    """Mint a bearer token for the API."""
    print(mint_token(get_settings(), company, admin=admin, ttl_s=ttl))


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
    from tenanttune import stack

    settings = get_settings()
    base = f"http://{settings.api_host}:{settings.api_port}"
    started = False
    if not _api_up(base):
        console.print("starting the local stack (Temporal, Redis, API, worker) ...")
        stack.start_detached(settings)
        started = True
    try:
        headers = {"Authorization": f"Bearer {mint_token(settings, company)}"}
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
            console.print(f"[green]trained[/green] model: [bold]{result['model_path']}[/bold]")
            console.print(
                f"  train loss {metrics['train_loss']:.3f}   eval loss "
                f"{metrics['first_eval_loss']:.3f} → {metrics['eval_loss']:.3f}   "
                f"{metrics['tokens_per_s']:.0f} tokens/s   {metrics['steps']} steps"
            )
            if not deploy:
                console.print(json.dumps(result, indent=2))
                return
            body = {"modelPath": result["model_path"], "version": version}
            queued = _check(http.post(f"/api/ai/models/{company}/deploy", json=body))
            console.print(f"queued [bold]{queued['jobId']}[/bold] → {queued['modelName']}")
            job = _follow(http, queued["jobId"])
            _fail_unless_completed(job)
        deployed = job["result"]
        check = deployed["verification"]
        console.print(
            f"[green]deployed[/green] [bold]{deployed['model_name']}[/bold] "
            f"({deployed['target']}: {deployed['location']})"
        )
        console.print(f"  asked:  {check['prompt']}")
        console.print(f"  answer: {check['text'].strip()}")
        console.print(
            f"  {check['tokens']} tokens in {check['latency_s']:.2f} s "
            f"({check['tokens_per_s']:.0f} tokens/s, llama.cpp)"
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


if __name__ == "__main__":
    app()
