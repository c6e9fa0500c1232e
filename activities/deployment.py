"""Activities of the deployment workflow: convert to GGUF, publish, verify, and roll back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.proc import ScriptRun, heartbeating
from activities.status import StatusActivities
from tenanttune import failpoints
from tenanttune.errors import InvalidModelError, VerificationFailedError
from tenanttune.settings import DEPLOYMENT_QUEUE, Settings
from tenanttune.types import (
    ConvertRequest,
    ConvertResult,
    PublishRequest,
    PublishResult,
    VerifyRequest,
    VerifyResult,
)
from training import chat, convert, dataset
from training.exits import EXIT_BAD_INPUT

DEFAULT_QUESTION = "What can you help me with?"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _weights_digest(model_dir: Path) -> str:
    """One digest over the directory's safetensors and configs: what a conversion reads."""
    h = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*config.json")):
        h.update(path.name.encode())
        h.update(_sha256(path).encode())
    return h.hexdigest()


def _base_of(model_path: Path) -> str:
    manifest = (model_path if model_path.is_dir() else model_path.parent) / "manifest.json"
    if manifest.exists():
        return str(json.loads(manifest.read_text()).get("base_model", ""))
    return ""


class DeploymentActivities:
    def __init__(self, settings: Settings, status: StatusActivities) -> None:
        self.settings = settings
        self.status = status

    # --- convert --------------------------------------------------------------------------

    @activity.defn
    async def convert_to_gguf(self, req: ConvertRequest) -> ConvertResult:
        """Merge + convert to GGUF unless the model path already holds one ("convert if needed")."""
        async with heartbeating():
            return await self._convert_to_gguf(req)

    async def _convert_to_gguf(self, req: ConvertRequest) -> ConvertResult:
        model_path = Path(req.model_path)
        is_hf = model_path.is_dir() and any(
            (model_path / f).exists() for f in ("adapter_config.json", "config.json")
        )
        existing = convert.find_gguf(model_path) if not is_hf else None
        converted = False
        if existing is None:
            existing = model_path / f"model-{req.outtype}.gguf"
            # The GGUF made from these exact weights earlier (a retry, or another tag) is reused.
            source = await asyncio.to_thread(_weights_digest, model_path)
            stamp = existing.with_name(existing.name + ".source")
            fresh = stamp.exists() and stamp.read_text() == source
            if not (fresh and existing.exists() and await self._readable(existing)):
                # Made from other weights (or unreadable): stale, never served.
                stamp.unlink(missing_ok=True)
                existing.unlink(missing_ok=True)
                await self._convert(model_path, existing, req.outtype)
                stamp.write_text(source)
                converted = True
        info = await asyncio.to_thread(convert.inspect, existing)
        digest = await asyncio.to_thread(_sha256, existing)
        await self.status.report_progress(DEPLOYMENT_QUEUE, req.job_id, 40.0, "converted")
        return ConvertResult(
            gguf_path=str(existing),
            sha256=digest,
            size=info.file_size,
            architecture=info.architecture,
            tensor_count=info.tensor_count,
            vocab_size=info.vocab_size,
            converted=converted,
            base_model=_base_of(model_path),
        )

    async def _readable(self, gguf: Path) -> bool:
        try:
            await asyncio.to_thread(convert.inspect, gguf)
        except convert.ConversionError:
            return False
        return True

    async def _convert(self, model_path: Path, outfile: Path, outtype: str) -> None:
        run = ScriptRun()
        rc = await run.run("training.convert", str(model_path), str(outfile), "--outtype", outtype)
        if rc == 0:
            return
        if rc == EXIT_BAD_INPUT:
            raise ApplicationError(
                run.last_event.get("message", "conversion refused the model"),
                type=InvalidModelError.__name__,
                non_retryable=True,
            )
        raise run.error("GGUF conversion")

    # --- publish --------------------------------------------------------------------------

    @activity.defn
    async def deploy_model(self, req: PublishRequest) -> PublishResult:
        """Publish the GGUF under the model name on the configured target."""
        async with heartbeating():
            if req.target == "ollama":
                publishing = asyncio.ensure_future(self._publish_ollama(req))
            else:
                publishing = asyncio.ensure_future(asyncio.to_thread(self._publish_local, req))
            try:
                # A cancel does not stop a rename in a thread or a create on the server: let it
                # land, then report the cancel; the workflow withdraws what landed.
                result = await asyncio.shield(publishing)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await publishing
                raise
            failpoints.hit("deploy_model.published")
            await self.status.report_progress(DEPLOYMENT_QUEUE, req.job_id, 70.0, "deployed")
        return result

    def registry_path(self, model_name: str) -> Path:
        name, _, tag = model_name.partition(":")
        return self.settings.registry_dir / name / (tag or "latest")

    def _publish_local(self, req: PublishRequest) -> PublishResult:
        """`<registry>/<name>/<tag>/` with model.gguf, Modelfile, metadata.json; one rename."""
        target = self.registry_path(req.model_name)
        meta_path = target / "metadata.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("digest") == req.gguf.sha256 and meta.get("deploy_job") == req.job_id:
                # A retry after a crash: this job already published exactly this file. It is
                # still this job's publication (created=True), so a failed verification
                # removes it.
                activity.logger.info("%s already published by this job; kept", req.model_name)
                return PublishResult(
                    req.model_name,
                    "local",
                    str(target),
                    req.gguf.sha256,
                    True,
                    replaced_previous=target.with_name(f".{target.name}.previous").exists(),
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{activity.info().attempt}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            os.link(req.gguf.gguf_path, tmp / "model.gguf")
        except OSError:
            shutil.copy(req.gguf.gguf_path, tmp / "model.gguf")
        (tmp / "Modelfile").write_text(chat.modelfile("./model.gguf"))
        meta = {
            "model_name": req.model_name,
            "digest": req.gguf.sha256,
            "size": req.gguf.size,
            "architecture": req.gguf.architecture,
            "base_model": req.gguf.base_model,
            "source_model_path": req.source_model_path,
            "source_job": req.source_job,
            "deploy_job": req.job_id,
            "created_at": datetime.now(UTC).isoformat(),
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
        previous = target.with_name(f".{target.name}.previous")
        replaced = False
        if target.exists():
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
            replaced = True
        tmp.rename(target)
        return PublishResult(req.model_name, "local", str(target), req.gguf.sha256, True, replaced)

    def _ollama(self) -> ollama.AsyncClient:
        return ollama.AsyncClient(host=self.settings.ollama_host, timeout=600)

    async def _publish_ollama(self, req: PublishRequest) -> PublishResult:
        """Upload the blob unless Ollama has it, then create the model unless it already exists."""
        digest = f"sha256:{req.gguf.sha256}"
        client = self._ollama()
        try:
            async with httpx.AsyncClient(base_url=self.settings.ollama_host, timeout=30) as http:
                head = await http.head(f"/api/blobs/{digest}")
            if head.status_code != 200:
                await client.create_blob(req.gguf.gguf_path)
            current = await _ollama_blob_of(client, req.model_name)
            marker = _marker(Path(req.gguf.gguf_path), self.settings.ollama_host, req.model_name)
            published_before = marker.exists() and json.loads(marker.read_text()) == {
                "digest": digest,
                "quantize": req.quantize,
            }
            # Older Ollama names our blob in FROM; newer ones rewrite the GGUF on create, so the
            # marker written after our own create is what recognises finished work there.
            if current is not None and (current == req.gguf.sha256 or published_before):
                # Already there: ours (a retry after a crash) if our marker says so.
                return PublishResult(
                    req.model_name, "ollama", self.settings.ollama_host, digest, published_before
                )
            await client.create(
                model=req.model_name,
                files={"model.gguf": digest},
                template=chat.OLLAMA_TEMPLATE,
                parameters={"stop": chat.STOP},
                quantize=req.quantize or None,
                stream=False,
            )
            marker.write_text(json.dumps({"digest": digest, "quantize": req.quantize}))
        except (httpx.ConnectError, httpx.TimeoutException, ConnectionError) as exc:
            raise ApplicationError(
                f"Ollama at {self.settings.ollama_host} is unreachable: {exc}"
            ) from exc
        except ollama.ResponseError as exc:
            raise ApplicationError(
                f"Ollama refused model {req.model_name} ({exc.status_code}): {exc.error}",
                type=InvalidModelError.__name__,
                non_retryable=400 <= exc.status_code < 500,
            ) from exc
        # `previous` lets a failed verification put the old model back under the name.
        return PublishResult(
            req.model_name,
            "ollama",
            self.settings.ollama_host,
            digest,
            True,
            replaced_previous=current is not None,
        )

    # --- verify ---------------------------------------------------------------------------

    @activity.defn
    async def verify_deployment(self, req: VerifyRequest) -> VerifyResult:
        """Ask the deployed model a question from the tenant's validation split."""
        # Loading the model (llama.cpp, or Ollama on its first request) says nothing for a while.
        async with heartbeating():
            return await self._verify_deployment(req)

    async def _verify_deployment(self, req: VerifyRequest) -> VerifyResult:
        system, question = self._question(req.company_id)
        published = req.published
        if published.target == "ollama":
            result = await self._verify_ollama(
                published.model_name, system, question, req.max_tokens
            )
        else:
            result = await self._verify_local(
                Path(published.location) / "model.gguf", system, question, req.max_tokens
            )
        if not result.text.strip():
            raise ApplicationError(
                f"deployed model {published.model_name} gave an empty answer to {question!r}",
                type=VerificationFailedError.__name__,
                non_retryable=True,
            )
        await self.status.report_progress(DEPLOYMENT_QUEUE, req.job_id, 95.0, "verified")
        return result

    def _question(self, company_id: str) -> tuple[str, str]:
        split = self.settings.data_dir / f"{company_id}-validation.jsonl"
        if split.exists():
            examples = dataset.read_examples(split)
            if examples:
                return chat.verification_prompt(examples[0])
        return "", DEFAULT_QUESTION

    async def _verify_local(
        self, gguf: Path, system: str, question: str, max_tokens: int
    ) -> VerifyResult:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        prompt = chat.prompt_text(messages)
        run = ScriptRun()
        rc = await run.run("training.infer", str(gguf), prompt, "--max-tokens", str(max_tokens))
        if rc != 0:
            message = run.last_event.get("message") or run.failure("llama.cpp")
            raise ApplicationError(
                f"llama.cpp could not answer with {gguf}: {message}",
                type=VerificationFailedError.__name__,
                non_retryable=rc == EXIT_BAD_INPUT,
            )
        e = run.last_event
        return VerifyResult(
            prompt=question,
            text=e["text"],
            tokens=e["tokens"],
            latency_s=e["latency_s"],
            tokens_per_s=e["tokens_per_s"],
        )

    async def _verify_ollama(
        self, name: str, system: str, question: str, max_tokens: int
    ) -> VerifyResult:
        client = self._ollama()
        try:
            await client.show(name)
            response = await client.generate(
                model=name,
                prompt=question,
                system=system,
                stream=False,
                options={"num_predict": max_tokens, "temperature": 0},
            )
        except (httpx.ConnectError, httpx.TimeoutException, ConnectionError) as exc:
            raise ApplicationError(
                f"Ollama at {self.settings.ollama_host} is unreachable: {exc}"
            ) from exc
        except ollama.ResponseError as exc:
            raise ApplicationError(
                f"Ollama could not run {name} ({exc.status_code}): {exc.error}",
                type=VerificationFailedError.__name__,
                non_retryable=exc.status_code == 404,
            ) from exc
        seconds = (response.total_duration or 0) / 1e9
        eval_s = (response.eval_duration or 0) / 1e9
        tokens = response.eval_count or 0
        return VerifyResult(
            prompt=question,
            text=response.response or "",
            tokens=tokens,
            latency_s=seconds,
            tokens_per_s=tokens / eval_s if eval_s else 0.0,
        )

    # --- roll back ------------------------------------------------------------------------

    @activity.defn
    async def unpublish_model(self, published: PublishResult) -> None:
        """Remove a model that failed verification; put back what was there before."""
        if published.target == "ollama":
            await self._unpublish_ollama(published)
            return
        target = Path(published.location)
        previous = target.with_name(f".{target.name}.previous")
        shutil.rmtree(target, ignore_errors=True)
        if previous.exists():
            previous.rename(target)

    async def _unpublish_ollama(self, published: PublishResult) -> None:
        client = self._ollama()
        try:
            await client.delete(published.model_name)
        except ollama.ResponseError as exc:
            if exc.status_code != 404:
                raise
        # Ollama keeps no second copy under one name; an older version under another
        # tag is untouched by the delete.

    @activity.defn
    async def withdraw_publication(self, req: PublishRequest) -> bool:
        """After a job stopped while publishing: if what is under the name is this job's
        publication, remove it and put back what was there before. True if it removed one."""
        if req.target == "ollama":
            marker = _marker(Path(req.gguf.gguf_path), self.settings.ollama_host, req.model_name)
            if not marker.exists():
                return False
            client = self._ollama()
            if await _ollama_blob_of(client, req.model_name) is None:
                return False
            await self._unpublish_ollama(
                PublishResult(req.model_name, "ollama", self.settings.ollama_host, "", True)
            )
            marker.unlink(missing_ok=True)
            return True
        target = self.registry_path(req.model_name)
        try:
            meta = json.loads((target / "metadata.json").read_text())
        except (OSError, ValueError):
            return False
        if meta.get("deploy_job") != req.job_id:
            return False  # another job's model (the previous version): never touched
        await self.unpublish_model(
            PublishResult(req.model_name, "local", str(target), meta.get("digest", ""), True)
        )
        return True

    @activity.defn
    async def finish_publish(self, published: PublishResult) -> None:
        """After a good verification: drop the kept-aside previous local version."""
        if published.target == "local":
            target = Path(published.location)
            shutil.rmtree(target.with_name(f".{target.name}.previous"), ignore_errors=True)


def _marker(gguf: Path, host: str, model_name: str) -> Path:
    """Beside the GGUF: proof that this file was published as `model_name` on `host`."""
    key = hashlib.sha256(f"{host}|{model_name}".encode()).hexdigest()[:16]
    return gguf.with_name(f".{gguf.name}.ollama-{key}.json")


async def _ollama_blob_of(client: ollama.AsyncClient, name: str) -> str | None:
    """The sha256 of the GGUF an existing Ollama model was made FROM, or None if none exists."""
    try:
        shown = await client.show(name)
    except ollama.ResponseError as exc:
        if exc.status_code == 404:
            return None
        raise
    found = re.search(r"sha256[-:]([0-9a-f]{64})", shown.modelfile or "")
    return found.group(1) if found else ""
