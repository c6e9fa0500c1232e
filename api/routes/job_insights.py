"""A job's numbers, its loss curve, and a live stream of its progress (server-sent events)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi.responses import Response, StreamingResponse

from api.deps import CurrentPrincipal, JobsDep, SettingsDep
from api.routes.jobs import own_job
from api.schemas import Job
from api.streams import event_stream_slot
from jobs.service import JobService
from tenanttune.settings import TRAINING_QUEUE, Settings

router = APIRouter(prefix="/api/ai/jobs", tags=["jobs"])

PNG_SIZE = (800, 480)  # pixels: 8 x 4.8 inches at 100 dpi
FINAL = ("completed", "failed")
POLL_S = 0.5
KEEPALIVE_S = 15.0


async def _training_metrics(job: Job, jobs: JobService, settings: Settings) -> dict[str, Any]:
    if job.queue != TRAINING_QUEUE:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"job '{job.jobId}' is a deployment: it has no loss curve"
        )
    saved = _saved_metrics(job, settings)
    if saved is not None:
        losses = [{"step": s, "loss": v} for s, v in saved.get("loss_history", [])]
        evals = [{"step": s, "evalLoss": v} for s, v in saved.get("eval_history", [])]
        tokens_per_s = saved.get("tokens_per_s")
        source = "model"
    else:
        # Still running (or its model is gone): what the job's event stream holds so far.
        losses, evals, tokens_per_s, source = [], [], None, "events"
        try:
            events = await jobs.events(job.jobId, count=100_000)
        except Exception:  # noqa: BLE001 - no mirror: nothing recorded to show
            events = []
        for _, event in events:
            if event.get("type") == "step":
                losses.append({"step": event["step"], "loss": event["loss"]})
                tokens_per_s = event.get("tokensPerS", tokens_per_s)
            elif event.get("type") == "eval":
                evals.append({"step": event["step"], "evalLoss": event["evalLoss"]})
    return {
        "jobId": job.jobId,
        "state": job.state,
        "source": source,
        "loss": losses,
        "evalLoss": evals,
        "tokensPerS": tokens_per_s,
        "trainLoss": losses[-1]["loss"] if losses else None,
        "firstEvalLoss": evals[0]["evalLoss"] if evals else None,
        "lastEvalLoss": evals[-1]["evalLoss"] if evals else None,
    }


def _saved_metrics(job: Job, settings: Settings) -> dict[str, Any] | None:
    """metrics.json of a finished job's model, if it lies inside MODELS_DIR."""
    result = job.result if isinstance(job.result, dict) else {}
    model_path = result.get("modelPath")
    if job.state != "completed" or not model_path:
        return None
    tenant_root = (settings.models_dir / job.companyId).resolve()
    path = (tenant_root / model_path).resolve() / "metrics.json"
    if not path.is_relative_to(tenant_root) or not path.is_file():
        return None
    saved: dict[str, Any] = json.loads(path.read_text())
    return saved


@router.get("/{job_id}/metrics")
async def job_metrics(
    job_id: str,
    principal: CurrentPrincipal,
    jobs: JobsDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Loss per step, eval loss and tokens/s of a training job (so far, while it runs)."""
    job = await own_job(job_id, jobs, principal)
    return await _training_metrics(job, jobs, settings)


@router.get("/{job_id}/loss.png", response_class=Response)
async def loss_png(
    job_id: str,
    principal: CurrentPrincipal,
    jobs: JobsDep,
    settings: SettingsDep,
) -> Response:
    """The training loss curve (and eval loss), as a PNG."""
    job = await own_job(job_id, jobs, principal)
    data = await _training_metrics(job, jobs, settings)
    if not data["loss"]:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job '{job_id}' has no loss recorded yet")
    # Drawn once per new point (a finished job's curve never changes): ~0.2 s of CPU a drawing.
    key = (job_id, job.state, len(data["loss"]), len(data["evalLoss"]))
    png = _drawn.get(key)
    if png is None:
        png = await asyncio.to_thread(_draw_loss, data)
        _drawn[key] = png
        while len(_drawn) > DRAWN_KEPT:
            _drawn.popitem(last=False)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=5"})


DRAWN_KEPT = 64
_drawn: OrderedDict[tuple[str, str, int, int], bytes] = OrderedDict()


def _draw_loss(data: dict[str, Any]) -> bytes:
    # The object API (no pyplot): no global state, safe in a worker thread. Imported here so
    # the API starts without loading matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p["step"] for p in data["loss"]], [p["loss"] for p in data["loss"]], label="train")
    if data["evalLoss"]:
        ax.plot(
            [p["step"] for p in data["evalLoss"]],
            [p["evalLoss"] for p in data["evalLoss"]],
            "o--",
            label="eval",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{data['jobId']} ({data['state']})")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    principal: CurrentPrincipal,
    jobs: JobsDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events: state changes, training steps with loss, checkpoints, completion.

    The stream replays the job's events from its start (or after `Last-Event-ID`) and ends
    after `completed` or `failed`, or after EVENT_STREAM_MAX_S (reconnect with Last-Event-ID).
    A tenant holds at most TENANT_MAX_EVENT_STREAMS streams at once.
    """
    job = await own_job(job_id, jobs, principal)
    if last_event_id is not None and not re.fullmatch(r"\d{1,20}-\d{1,20}", last_event_id):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"Last-Event-ID {last_event_id[:40]!r} is not an event id from this stream "
            "(they look like 1732800000000-0)",
        )
    slot = event_stream_slot(request, job.companyId)
    deadline = await slot.__aenter__()

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in _events(deadline):
                yield chunk
        finally:
            await slot.__aexit__(None, None, None)

    async def _events(deadline: float) -> AsyncIterator[str]:
        after = last_event_id or "0-0"
        quiet_s = 0.0
        while True:
            if await request.is_disconnected():
                return
            if time.monotonic() > deadline:
                yield ": this stream's time is up; reconnect with Last-Event-ID\n\n"
                return
            try:
                events = await jobs.events(job_id, after)
            except Exception:  # noqa: BLE001 - no mirror: follow the job's state instead
                async for chunk in _follow_state(jobs, job_id, request, deadline):
                    yield chunk
                return
            for event_id, event in events:
                after = event_id
                kind = str(event.get("type", "message"))
                yield _sse(kind, event, event_id)
                if kind in FINAL:
                    return
            if events:
                quiet_s = 0.0
                continue
            quiet_s += POLL_S
            if quiet_s >= KEEPALIVE_S:
                # Nothing for a while: finished with its events expired or never mirrored?
                info = await jobs.get(job_id)
                if info is None:  # removed (clean, removeOnComplete): nothing more will come
                    return
                if info.state in FINAL:
                    yield _sse(info.state, _final_event(info.state, info.result, info), None)
                    return
                quiet_s = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _follow_state(
    jobs: JobService, job_id: str, request: Request, deadline: float
) -> AsyncIterator[str]:
    """Without Redis: poll the job (answered by Temporal) and send each change of state."""
    last: tuple[str, float] | None = None
    while not await request.is_disconnected() and time.monotonic() < deadline:
        info = await jobs.get(job_id)
        if info is None:
            return
        if (info.state, info.progress) != last:
            last = (info.state, info.progress)
            if info.state in FINAL:
                yield _sse(info.state, _final_event(info.state, info.result, info), None)
                return
            yield _sse(
                "state",
                {
                    "type": "state",
                    "state": info.state,
                    "stage": info.stage,
                    "progress": info.progress,
                },
                None,
            )
        await asyncio.sleep(2.0)


def _final_event(state: str, result: Any, info: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": state, "state": state, "stage": info.stage}
    if result is not None:
        event["result"] = result
    if info.failedReason:
        event["failedReason"] = info.failedReason
    return event


def _sse(kind: str, data: dict[str, Any], event_id: str | None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"
