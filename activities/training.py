"""Activities of the training workflow: export the data, train (subprocess), register the model."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.proc import (
    REPO_ROOT,
    ScriptRun,
    WriteBehind,
    die_with_parent,
    heartbeating,
    terminate,
)
from activities.status import StatusActivities
from tenanttune import telemetry
from tenanttune.errors import (
    BaseModelError,
    InvalidDatasetError,
    ResourceLimitError,
    TrainingFailedError,
)
from tenanttune.settings import TRAINING_QUEUE, Settings
from tenanttune.types import (
    ExportRequest,
    ExportResult,
    RegisterModelRequest,
    TrainModelRequest,
    TrainModelResult,
    TrainResult,
)
from training import dataset, tokens
from training.base_model import short_name
from training.exits import EXIT_BAD_INPUT
from training.train import TrainConfig

log = logging.getLogger(__name__)

# Share of the job's progress bar each stage covers.
EXPORT_DONE, TRAIN_DONE = 5.0, 95.0


class TrainingActivities:
    def __init__(self, settings: Settings, status: StatusActivities) -> None:
        self.settings = settings
        self.status = status

    @activity.defn
    async def export_training_data(self, req: ExportRequest) -> ExportResult:
        """Validate and clean the tenant's raw JSONL; write the splits this job trains on."""
        s = self.settings
        run_data = s.runs_dir / req.job_id / "data"
        outputs = [
            (run_data / "train.jsonl", run_data / "validation.jsonl"),
            # The tenant's latest export, at the path the manual training command uses.
            (
                s.data_dir / f"{req.company_id}-training.jsonl",
                s.data_dir / f"{req.company_id}-validation.jsonl",
            ),
        ]
        tenant_dir = s.tenant_data_dir(req.company_id)
        try:
            exported = await asyncio.to_thread(
                dataset.export,
                tenant_dir,
                outputs,
                max_example_chars=s.max_example_chars,
                validation_share=s.validation_share,
                min_examples=s.min_examples,
            )
        except ValueError as exc:
            raise ApplicationError(
                f"training data for {req.company_id} in {tenant_dir} is not usable: {exc}",
                type=InvalidDatasetError.__name__,
                non_retryable=True,
            ) from exc
        if req.hyperparameters is not None:
            await self._check_budget(req, outputs[0][0])
        await self.status.report_progress(TRAINING_QUEUE, req.job_id, EXPORT_DONE, "training")
        return ExportResult(
            train_path=str(outputs[0][0]),
            validation_path=str(outputs[0][1]),
            dataset_size=exported.report.usable,
            validation_size=exported.validation_size,
            quality_score=exported.report.quality_score,
            dataset_sha256=exported.sha256,
        )

    async def _check_budget(self, req: ExportRequest, train_file: Path) -> None:
        """The token budget again, on the data this job will really train on (it may have grown
        since the job was queued), with the base model's own tokenizer."""
        assert req.hyperparameters is not None
        hp = req.hyperparameters
        # The base's tokenizer where it is on this host (the built-in base once built): the
        # same count the API made; without it, the same upper bound the API used.
        base = req.base_model or str(self.settings.tiny_base_dir)
        examples = await asyncio.to_thread(dataset.read_examples, train_file)
        counted = await asyncio.to_thread(tokens.count, base, examples, hp.max_seq_len)
        total = counted.tokens * hp.epochs
        if total > self.settings.train_max_token_budget:
            raise ApplicationError(
                f"the exported data of {req.company_id} is {counted.tokens:,} tokens, so "
                f"{hp.epochs} epochs would train {total:,} tokens, over the budget of "
                f"{self.settings.train_max_token_budget:,} (TRAIN_MAX_TOKEN_BUDGET); the data "
                "grew since the job was queued: remove some, or lower epochs or maxSeqLength",
                type=ResourceLimitError.__name__,
                non_retryable=True,
            )

    @activity.defn
    async def train_model(self, req: TrainModelRequest) -> TrainModelResult:
        """Run `python -m training.train` in a subprocess; heartbeat its progress.

        It heartbeats from its first moment (building the tiny base model, loading weights)
        to its last, on a clock. A retry resumes from the checkpoint named in the last
        heartbeat. Cancelling the activity terminates the subprocess's whole process group.
        How many run at once is the worker's business: it takes train_model tasks from their
        own task queue only while it has a free training slot, so a job waiting for one waits
        in Temporal's queue, not in here.
        """
        details: dict[str, Any] = {"step": 0, "total": 0, "loss": None, "checkpoint": ""}
        async with heartbeating(details):
            return await self._train(req, details)

    async def _train(self, req: TrainModelRequest, details: dict[str, Any]) -> TrainModelResult:
        info = activity.info()
        run_dir = self.settings.runs_dir / req.job_id
        output_dir = run_dir / f"attempt-{info.attempt}"
        if not self.settings.allows_base_model(req.base_model):  # the API checks it too
            raise ApplicationError(
                f"base model {req.base_model!r} is not in this worker's ALLOWED_BASE_MODELS",
                type=BaseModelError.__name__,
                non_retryable=True,
            )
        base = req.base_model or await self._tiny_base()
        resume = _checkpoint_from(info.heartbeat_details) or _latest_checkpoint(
            run_dir / "checkpoints"
        )
        details["checkpoint"] = resume
        config = TrainConfig(
            base_model=base,
            train_file=req.train_path,
            eval_file=req.validation_path,
            output_dir=str(output_dir),
            checkpoint_dir=str(run_dir / "checkpoints"),
            hyperparameters=req.hyperparameters,
            save_steps=req.save_steps,
            resume_from_checkpoint=resume,
        )
        config_file = run_dir / f"attempt-{info.attempt}.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(config.to_json())
        if resume:
            log.info("job %s attempt %d resumes from %s", req.job_id, info.attempt, resume)
        run = _TrainingRun(self.status, req.job_id, details, self.settings)
        await run.execute(["--config", str(config_file)])
        metrics = json.loads((output_dir / "metrics.json").read_text())
        return TrainModelResult(
            adapter_path=str(output_dir),
            base_model=base,
            metrics=_summary(metrics),
            resumed_from_step=int(metrics.get("resumed_from_step", 0)),
        )

    async def _tiny_base(self) -> str:
        """Build the tiny base model in a subprocess (torch stays out of the worker)."""
        target = self.settings.tiny_base_dir
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "training.base_model",
            str(target),
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        try:
            out, _ = await proc.communicate()
        except BaseException:  # cancelled: the builder must not outlive the attempt
            await terminate(proc)
            raise
        if proc.returncode != 0:
            raise ApplicationError(f"building the tiny base model failed: {out.decode()[-2000:]}")
        return str(target)

    @activity.defn
    async def register_model(self, req: RegisterModelRequest) -> TrainResult:
        """Publish the adapter under <models>/<company>/<version>/ with a manifest (one rename)."""
        target = self.settings.models_dir / req.company_id / req.version
        manifest_path = target / "manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("job_id") != req.job_id:
                raise ApplicationError(
                    f"model version {req.version} of {req.company_id} already exists "
                    f"(made by job {manifest.get('job_id')}); choose another version",
                    type=TrainingFailedError.__name__,
                    non_retryable=True,
                )
        else:
            manifest = {
                "company_id": req.company_id,
                "version": req.version,
                "job_id": req.job_id,
                "base_model": req.base_model,
                "hyperparameters": asdict(req.hyperparameters),
                "dataset": {
                    "sha256": req.export.dataset_sha256,
                    "size": req.export.dataset_size,
                    "validation_size": req.export.validation_size,
                    "quality_score": req.export.quality_score,
                },
                "metrics": req.metrics,
                "created_at": datetime.now(UTC).isoformat(),
            }
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(req.adapter_path, tmp)
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp.rename(target)
            finally:
                # A failed copy (disk full, ...) leaves nothing half-written behind.
                shutil.rmtree(tmp, ignore_errors=True)
        # The job's scratch space (checkpoints, attempts) is no longer needed.
        shutil.rmtree(self.settings.runs_dir / req.job_id, ignore_errors=True)
        await self.status.report_progress(TRAINING_QUEUE, req.job_id, 100.0, "registered")
        return TrainResult(
            model_path=str(target),
            version=req.version,
            base_model=req.base_model,
            metrics=req.metrics,
            dataset_size=req.export.dataset_size,
            quality_score=req.export.quality_score,
            base_short_name=short_name(req.base_model),
        )


class _TrainingRun:
    """One training subprocess: its JSON lines turned into heartbeat details and job progress.

    Nothing here waits: details are updated in place (the clock in `heartbeating` sends them),
    and the mirror writes go to a write-behind queue.
    """

    def __init__(
        self, status: StatusActivities, job_id: str, details: dict[str, Any], settings: Settings
    ) -> None:
        self.status = status
        self.job_id = job_id
        self.script = ScriptRun(
            self._on_event,
            memory_mb=settings.train_max_memory_mb,
            wall_clock_s=settings.train_max_wall_clock_s,
        )
        self.script.details = details
        self.writes = WriteBehind()
        self.error: dict[str, Any] | None = None

    async def execute(self, args: list[str]) -> None:
        """Run to the end; raise ApplicationError (retryable or not) if it fails."""
        async with self.writes.running():
            rc = await self.script.run("training.train", *args)
        if rc == 0:
            return
        if rc == EXIT_BAD_INPUT and self.error:
            raise ApplicationError(
                self.error.get("message", "training input rejected"),
                type=self.error.get("kind", TrainingFailedError.__name__),
                non_retryable=True,
            )
        raise self.script.error("training process")

    def _on_event(self, event: dict[str, Any]) -> None:
        details = self.script.details
        kind = event.get("event")
        if kind == "start":
            details["total"] = event["total_steps"]
        elif kind == "step":
            details.update(
                step=event["step"],
                total=event["total_steps"],
                loss=event["loss"],
                epoch=event["epoch"],
                tokens_per_s=event["tokens_per_s"],
            )
            total = max(int(event["total_steps"]), 1)
            progress = EXPORT_DONE + (TRAIN_DONE - EXPORT_DONE) * event["step"] / total
            self.writes.add(
                partial(
                    self.status.report_progress, TRAINING_QUEUE, self.job_id, progress, "training"
                )
            )
        elif kind == "eval":
            details["eval_loss"] = event["eval_loss"]
        elif kind == "checkpoint":
            details["checkpoint"] = event["path"]
            activity.heartbeat(dict(details))  # a retry should resume from it: send it now
        elif kind == "error":
            self.error = event
        if kind in _PUBLISHED:
            fields = {k: event[k] for k in _PUBLISHED[str(kind)] if k in event}
            telemetry.add_span_event(str(kind), fields)
            self.writes.add(
                partial(
                    self.status.record_event,
                    TRAINING_QUEUE,
                    self.job_id,
                    {"type": kind, **fields},
                )
            )


# The training script's events a job's followers see, with the fields they get.
_PUBLISHED = {
    "step": ("step", "total_steps", "epoch", "loss", "lr", "tokens_per_s"),
    "eval": ("step", "eval_loss"),
    "checkpoint": ("step",),
}


def _checkpoint_from(details: Any) -> str:
    if details and isinstance(details[0], dict):
        path = details[0].get("checkpoint") or ""
        if path and Path(path).is_dir():
            return str(path)
    return ""


def _latest_checkpoint(directory: Path) -> str:
    done = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else ""


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "steps",
        "total_steps",
        "resumed_from_step",
        "train_loss",
        "first_eval_loss",
        "eval_loss",
        "train_tokens",
        "tokens_per_s",
        "runtime_s",
        "train_examples",
        "eval_examples",
    )
    return {k: metrics.get(k) for k in keep}
