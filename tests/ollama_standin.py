"""A test STAND-IN for the Ollama HTTP API, cut down to the calls TenantTune makes. Tests only.

No Ollama server can run where these tests run. This serves what `activities/deployment.py`
asks of Ollama through the official `ollama` client, with the real server's paths, methods,
status codes, JSON fields and ``{"error": "..."}`` bodies (ollama/ollama ``server/routes.go``,
``server/create.go``):

- ``HEAD|POST /api/blobs/sha256:<hex>``: publish uploads the GGUF only when Ollama lacks it.
- ``POST /api/create``: publish, from ``files`` (one GGUF) with ``template``, ``parameters``,
  ``system`` and ``quantize``; or ``from`` a model already here plus ``adapters`` (a LoRA GGUF).
- ``POST /api/show``: publish reads which blob a name was made FROM; verify checks the name.
- ``POST /api/generate``: verify asks a question; llama.cpp really runs the GGUF (and adapter).
- ``DELETE /api/delete``: rollback of a model that failed verification.
- ``GET /api/tags``: tests list what was deployed.

``create`` and ``generate`` answer NDJSON unless the request says ``"stream": false``, as
Ollama does (here the lines go out once the work is done). Blobs live where Ollama keeps them,
``<state_dir>/blobs/sha256-<hex>``; models are kept in memory.

Where it cannot do what Ollama does it answers 501 rather than pretend: request fields other than
those above, template actions other than ``.System``, ``.Prompt``, ``.Response`` and
``if .System``/``else``/``end``, safetensors or several files. A GGUF from ``files`` is kept as
uploaded, as Ollama did before 0.30 (since 0.30 it is rewritten by llama-quantize, so ``show``
names a new blob, as after ``quantize`` here). ``from`` cannot pull.

Not Ollama: ``GET /_standin/stats`` tells a test what the stand-in received.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

__all__ = ["OllamaStandin", "Received", "create_app", "run_standin"]

_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")  # manifest.BlobsPath
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,79}(/[A-Za-z0-9][\w.-]{0,79}){0,2}(:\w[\w.-]{0,127})?$")
# fs/ggml/type.go: the GGUF file types `quantize` accepts, by general.file_type.
_FILE_TYPES = {0: "F32", 1: "F16", 7: "Q8_0", 14: "Q4_K_S", 15: "Q4_K_M", 32: "BF16"}
_QUANTIZE = {name: number for number, name in _FILE_TYPES.items()}
_CREATE_FIELDS = {"model", "stream", "files", "from", "adapters", "template", "system"}
_CREATE_FIELDS |= {"parameters", "quantize"}
_GENERATE_FIELDS = {"model", "prompt", "system", "stream", "options", "keep_alive"}
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
# api.DefaultOptions, and envconfig's default context length.
_DEFAULT_OPTIONS: dict[str, Any] = {"num_predict": -1, "temperature": 0.8, "top_k": 40}
_DEFAULT_OPTIONS |= {"top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0, "seed": -1}
_DEFAULT_OPTIONS |= {"num_ctx": 4096, "stop": []}


class _Fail(Exception):
    """An answer ``{"error": message}`` with the status Ollama gives it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _unsupported(body: dict[str, Any], known: set[str]) -> None:
    extra = sorted(
        k for k, v in body.items() if k not in known and v not in (None, False, "", [], {})
    )
    if extra:
        raise _Fail(501, f"ollama stand-in: {', '.join(extra)} not implemented")


def _key(name: str) -> str | None:
    """The name as Ollama looks it up: tag `latest` by default, case ignored."""
    name = name.strip()
    if not _NAME.match(name):
        return None
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _human(n: int) -> str:
    """format.HumanNumber, for `parameter_size`."""
    for unit, size, digits in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 0)):
        if n >= size:
            return f"{n / size:.{0 if n % size == 0 or unit == 'K' else digits}f}{unit}"
    return str(n)


def _quote(s: str) -> str:
    """parser.quote: how a Modelfile command's argument is written."""
    if "\n" in s or s.startswith(" ") or s.endswith(" "):
        return f'"""{s}"""' if '"' in s else f'"{s}"'
    return s


@functools.lru_cache(maxsize=64)
def _gguf_info(path: Path) -> dict[str, Any]:
    """What `show` and `tags` report of a GGUF: architecture, file type, size, scalar metadata."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    kv = {
        name: f.contents()
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.") and f.types and f.types[0] != GGUFValueType.ARRAY
    }
    file_type = kv.get("general.file_type")
    return {
        "architecture": str(kv.get("general.architecture", "")),
        "file_type": _FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else "",
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "kv": {k: v for k, v in kv.items() if isinstance(v, str | int | float | bool)},
    }


def _render(template: str, system: str, prompt: str) -> str:
    """The prompt from a Go template, for the few actions TenantTune's template uses. Like
    Ollama's generate, what follows `.Response` is not rendered."""
    values = {".System": system, ".Prompt": prompt}
    out: list[str] = []
    taken = [True]  # whether each enclosing `if` branch is the one rendered
    pos, trim_next, stopped = 0, False, False

    def emit(text: str) -> None:
        if all(taken) and not stopped:
            out.append(text)

    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        text = text.lstrip() if trim_next else text
        emit(text.rstrip() if m.group(1) else text)
        action, trim_next, pos = m.group(2), bool(m.group(3)), m.end()
        if action == ".Response":
            stopped = True
        elif action in values:
            emit(values[action])
        elif action == "if .System":
            taken.append(bool(system))
        elif action == "else" and len(taken) > 1:
            taken[-1] = not taken[-1]
        elif action == "end" and len(taken) > 1:
            taken.pop()
        else:
            raise _Fail(501, f"ollama stand-in: template action {{{{ {action} }}}} not implemented")
    if len(taken) > 1:
        raise _Fail(400, "template error: template: :1: unexpected EOF")
    emit(template[pos:].lstrip() if trim_next else template[pos:])
    return "".join(out)


@dataclass
class _Model:
    name: str  # as created, with its tag
    gguf: str  # the model layer's digest, "sha256:<hex>"
    adapters: list[str] = field(default_factory=list)
    template: str = "{{ .Prompt }}"
    system: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    parent: str = ""
    modified_at: datetime = field(default_factory=lambda: _Model.modified_now())

    @staticmethod
    def modified_now() -> datetime:
        return datetime.now(UTC).astimezone()


@dataclass
class Received:
    """What the stand-in was sent, for tests (`GET /_standin/stats`)."""

    blob_posts: int = 0
    blob_writes: int = 0  # uploads stored as a new blob
    create_requests: list[dict[str, Any]] = field(default_factory=list)  # bodies as sent

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"creates": len(self.create_requests)}


class OllamaStandin:
    def __init__(self, state_dir: Path) -> None:
        self.blobs = state_dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, _Model] = {}  # by lower-cased full name
        self.received = Received()
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, ...], tuple[Any, threading.Lock]] = {}

    def blob(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise _Fail(400, "invalid digest format")
        return self.blobs / digest.replace(":", "-")

    def find(self, name: str) -> _Model | None:
        key = _key(name)
        return self.models.get(key.lower()) if key else None

    # /api/blobs ----------------------------------------------------------------------------

    def head_blob(self, digest: str) -> Response:
        if not self.blob(digest).is_file():
            raise _Fail(404, f'blob "{digest}" not found')
        return Response(status_code=200)

    async def post_blob(self, digest: str, request: Request) -> Response:
        self.received.blob_posts += 1
        if self.blob(digest).exists():
            return Response(status_code=200)  # the body is not read
        h = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.blobs, prefix="upload-", delete=False) as out:
            async for chunk in request.stream():
                h.update(chunk)
                out.write(chunk)
        real = f"sha256:{h.hexdigest()}"
        # manifest.NewLayer keeps the body under its real digest before the handler compares.
        Path(out.name).replace(self.blob(real))
        self.received.blob_writes += 1
        if real != digest:
            raise _Fail(400, f'digest mismatch, expected "{digest}", got "{real}"')
        return Response(status_code=201)

    # /api/create ---------------------------------------------------------------------------

    def check_create(self, body: dict[str, Any]) -> str:
        """What CreateHandler refuses before it starts: the name to create, or _Fail."""
        _unsupported(body, _CREATE_FIELDS)
        for path, digest in (body.get("files") or {}).items():
            if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
                raise _Fail(400, "file path must be relative")
            if not digest:
                raise _Fail(400, "invalid digest format")
        if not all((body.get("adapters") or {}).values()):
            raise _Fail(400, "invalid digest format")
        name = _key(body.get("model") or "")
        if name is None:
            raise _Fail(400, "invalid model name")
        return name

    def create(self, body: dict[str, Any], name: str) -> list[Any]:
        """The rest of CreateHandler: its progress messages, the last one `success` or a _Fail."""
        progress: list[Any] = []
        try:
            self._create(body, name, progress.append)
        except _Fail as exc:
            progress.append(exc)
        return progress

    def _create(self, body: dict[str, Any], name: str, emit: Callable[[Any], None]) -> None:
        if body.get("from"):
            base = self.find(body["from"])
            if base is None:
                raise _Fail(500, f"ollama stand-in: no model {body['from']!r} here, and no pull")
            model = replace(base, name=name, parent=base.name, adapters=[*base.adapters])
            model.parameters, model.modified_at = {**base.parameters}, _Model.modified_now()
        elif body.get("files") is not None:
            model = _Model(name, self._gguf_file(body["files"], emit, adapter=False))
        else:
            raise _Fail(400, "neither 'from' or 'files' was specified")
        if body.get("adapters"):
            model.adapters.append(self._gguf_file(body["adapters"], emit, adapter=True))
        if body.get("quantize"):
            model.gguf = self._quantize(model.gguf, body["quantize"].upper(), emit)
        if body.get("template"):
            _render(body["template"], "", "")  # refuses a template this stand-in cannot render
            model.template = body["template"]
        model.system = body.get("system") or model.system
        model.parameters |= body.get("parameters") or {}
        emit({"status": "writing manifest"})
        with self._lock:
            old = self.models.get(name.lower())
            self.models[name.lower()] = model
            if old is not None:
                self._prune(old)
        emit({"status": "success"})

    def _gguf_file(
        self, files: dict[str, str], emit: Callable[[Any], None], *, adapter: bool
    ) -> str:
        """convertModelFromFiles for one GGUF: its digest once checked."""
        if any(f.endswith(".safetensors") for f in files):
            raise _Fail(501, "ollama stand-in: converting safetensors not implemented")
        if len(files) > 1:
            if adapter:
                raise _Fail(400, "only one adapter is currently supported")
            raise _Fail(501, "ollama stand-in: more than one file not implemented")
        [(filename, digest)] = files.items()
        emit({"status": "parsing GGUF"})
        status = 400 if adapter else 500  # create.go: every adapter error is a 400
        try:
            with self.blob(digest).open("rb") as fh:
                magic = fh.read(4)
        except _Fail as exc:
            raise _Fail(status, exc.message) from exc
        except FileNotFoundError as exc:
            raise _Fail(status, f"open {exc.filename}: no such file or directory") from exc
        if magic != b"GGUF" and filename.endswith(".gguf"):
            raise _Fail(400, "supplied file was not in GGUF format")
        if magic != b"GGUF":
            raise _Fail(400, "unknown type")
        return digest

    def _quantize(self, digest: str, want: str, emit: Callable[[Any], None]) -> str:
        """Like Ollama, llama.cpp writes the quantized GGUF: a new blob the model is made FROM."""
        import llama_cpp

        if want not in _QUANTIZE:
            supported = "F32, F16, Q4_K_S, Q4_K_M, Q8_0"
            raise _Fail(
                500, f"unsupported quantization type {want} - supported types are {supported}"
            )
        have = _gguf_info(self.blob(digest))["file_type"]
        if have not in ("F16", "BF16", "F32"):
            raise _Fail(500, "quantization is only supported for F16, BF16 and F32 models")
        if have == want:
            return digest
        emit({"status": f"quantizing {have} model to {want}"})
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _QUANTIZE[want]
        with tempfile.TemporaryDirectory(dir=self.blobs) as tmp:
            out = Path(tmp) / "model.gguf"
            src = str(self.blob(digest)).encode()
            if llama_cpp.llama_model_quantize(src, str(out).encode(), ctypes.byref(params)):
                raise _Fail(500, "llama-quantize failed")
            with out.open("rb") as fh:
                new = f"sha256:{hashlib.file_digest(fh, 'sha256').hexdigest()}"
            out.replace(self.blob(new))
        return new

    def _prune(self, gone: _Model) -> None:
        """Manifest.RemoveLayers: the blobs no other model uses go (call with the lock held)."""
        used = {d for m in self.models.values() for d in (m.gguf, *m.adapters)}
        for digest in {gone.gguf, *gone.adapters} - used:
            for key in [k for k in self._runners if digest in k]:
                llm, lock = self._runners.pop(key)
                with lock:
                    llm.close()
            self.blob(digest).unlink(missing_ok=True)

    # /api/tags, /api/show, /api/delete ------------------------------------------------------

    def _details(self, model: _Model) -> dict[str, Any]:
        info = _gguf_info(self.blob(model.gguf))
        return {
            "parent_model": model.parent,
            "format": "gguf",
            "family": info["architecture"],
            "families": [info["architecture"]],
            "parameter_size": _human(info["parameters"]),
            "quantization_level": info["file_type"],
        }

    def tags(self) -> dict[str, Any]:
        models = sorted(self.models.values(), key=lambda m: m.modified_at, reverse=True)
        listed = []
        for m in models:
            layers = json.dumps([m.gguf, m.adapters, m.template, m.system, m.parameters])
            listed.append(
                {
                    "name": m.name,
                    "model": m.name,
                    "modified_at": m.modified_at.isoformat(),
                    "size": sum(self.blob(d).stat().st_size for d in (m.gguf, *m.adapters)),
                    "digest": hashlib.sha256(layers.encode()).hexdigest(),
                    "details": self._details(m),
                }
            )
        return {"models": listed}

    def show(self, body: dict[str, Any]) -> dict[str, Any]:
        requested = body.get("model") or ""
        if not requested:
            raise _Fail(400, "model is required")
        model = self.find(requested)
        if model is None:
            raise _Fail(404, f"model '{_key(requested) or requested}' not found")
        values = [
            (k, x) for k, v in model.parameters.items() for x in (v if isinstance(v, list) else [v])
        ]
        modelfile = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {model.name}\n",
            f"FROM {self.blob(model.gguf)}",
            *(f"ADAPTER {self.blob(d)}" for d in model.adapters),
            f"TEMPLATE {_quote(model.template)}",
            *([f"SYSTEM {_quote(model.system)}"] if model.system else []),
            *(f"PARAMETER {k} {_quote(str(x))}" for k, x in values),
        ]
        shown = {
            "modelfile": "\n".join(modelfile) + "\n",
            "parameters": "\n".join(f"{k:<30} {json.dumps(x)}" for k, x in values),
            "template": model.template,
            "details": self._details(model),
            "model_info": _gguf_info(self.blob(model.gguf))["kv"],
            "capabilities": ["completion"],
            "modified_at": model.modified_at.isoformat(),
        }
        return shown | ({"system": model.system} if model.system else {})

    def delete(self, body: dict[str, Any]) -> Response:
        requested = body.get("model") or ""
        with self._lock:
            model = self.find(requested)
            if model is None:
                raise _Fail(404, f"model '{requested}' not found")
            del self.models[model.name.lower()]
            self._prune(model)
        return Response(status_code=200)

    # /api/generate -------------------------------------------------------------------------

    def generate(self, body: dict[str, Any], start: int) -> dict[str, Any]:
        """GenerateHandler, not streamed: the final answer with all the text and the metrics."""
        requested = body.get("model") or ""
        model = self.find(requested)
        if model is None:
            raise _Fail(404, f"model '{requested}' not found")
        _unsupported(body, _GENERATE_FIELDS)
        answer: dict[str, Any] = {"model": requested, "created_at": _now(), "response": ""}
        opts = _DEFAULT_OPTIONS | model.parameters | (body.get("options") or {})
        llm, lock = self._runner(model, int(opts["num_ctx"]))
        loaded = time.perf_counter_ns()
        if not body.get("prompt"):  # an empty prompt only loads the model
            return answer | {"done": True, "done_reason": "load"}
        prompt = _render(model.template, body.get("system") or model.system, body["prompt"])
        with lock:
            out = llm.create_completion(
                prompt,
                max_tokens=opts["num_predict"] if opts["num_predict"] > 0 else None,
                temperature=opts["temperature"],
                top_k=opts["top_k"],
                top_p=opts["top_p"],
                min_p=opts["min_p"],
                repeat_penalty=opts["repeat_penalty"],
                seed=opts["seed"] if opts["seed"] >= 0 else None,
                stop=opts["stop"] or None,
            )
        done = time.perf_counter_ns()
        return answer | {
            "response": out["choices"][0]["text"],
            "done": True,
            "done_reason": out["choices"][0]["finish_reason"],
            "total_duration": done - start,
            "load_duration": loaded - start,
            "prompt_eval_count": out["usage"]["prompt_tokens"],
            "eval_count": out["usage"]["completion_tokens"],
            "eval_duration": done - loaded,  # the prompt's evaluation included
        }

    def _runner(self, model: _Model, n_ctx: int) -> tuple[Any, threading.Lock]:
        key = (model.gguf, *model.adapters, str(n_ctx))
        with self._lock:
            if key not in self._runners:
                import llama_cpp

                lora = str(self.blob(model.adapters[-1])) if model.adapters else None
                try:
                    llm = llama_cpp.Llama(
                        str(self.blob(model.gguf)), lora_path=lora, n_ctx=n_ctx, verbose=False
                    )
                except (ValueError, RuntimeError) as exc:
                    raise _Fail(500, f"llama runner process has terminated: {exc}") from exc
                self._runners[key] = (llm, threading.Lock())
            return self._runners[key]

    def close(self) -> None:
        with self._lock:
            for llm, lock in self._runners.values():
                with lock:
                    llm.close()
            self._runners.clear()


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise _Fail(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _Fail(400, str(exc)) from exc
    if not isinstance(body, dict):
        raise _Fail(400, f"json: cannot unmarshal {type(body).__name__} into Go value")
    return body


def _json(answer: Any) -> Response:
    return (
        _error(answer.status, answer.message) if isinstance(answer, _Fail) else JSONResponse(answer)
    )


def _ndjson(lines: list[Any]) -> Response:
    """streamResponse: an error before any line sets the status; after one, it is the last line."""
    if isinstance(lines[0], _Fail):
        return _json(lines[0])
    text = "".join(
        json.dumps({"error": x.message} if isinstance(x, _Fail) else x) + "\n" for x in lines
    )
    return StreamingResponse(iter([text]), media_type="application/x-ndjson")


def create_app(standin: OllamaStandin) -> FastAPI:
    app = FastAPI(title="Ollama stand-in (tests only)", openapi_url=None)

    @app.exception_handler(_Fail)
    async def failed(_request: Request, exc: _Fail) -> Response:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def no_route(_request: Request, _exc: HTTPException) -> Response:
        return PlainTextResponse("404 page not found", status_code=404)  # gin's, wrong method too

    @app.head("/api/blobs/{digest}")
    async def head_blob(digest: str) -> Response:
        return standin.head_blob(digest)

    @app.post("/api/blobs/{digest}")
    async def post_blob(digest: str, request: Request) -> Response:
        return await standin.post_blob(digest, request)

    @app.post("/api/create")
    async def create(request: Request) -> Response:
        body = await _body(request)
        standin.received.create_requests.append(body)
        progress = await anyio.to_thread.run_sync(standin.create, body, standin.check_create(body))
        if body.get("stream") is False:  # waitForStream: the last progress, or the error
            return _json(progress[-1])
        return _ndjson(progress)

    @app.get("/api/tags")
    async def tags() -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(standin.tags))

    @app.post("/api/show")
    async def show(request: Request) -> Response:
        body = await _body(request)
        return JSONResponse(await anyio.to_thread.run_sync(standin.show, body))

    @app.delete("/api/delete")
    async def delete(request: Request) -> Response:
        body = await _body(request)
        return await anyio.to_thread.run_sync(standin.delete, body)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        start = time.perf_counter_ns()
        body = await _body(request)
        final = await anyio.to_thread.run_sync(standin.generate, body, start)
        if body.get("stream") is False:
            return JSONResponse(final)
        text, final["response"] = final["response"], ""
        chunk = {"model": final["model"], "created_at": final["created_at"], "response": text}
        return _ndjson([chunk | {"done": False}, final] if text else [final])

    @app.get("/_standin/stats")
    async def stats() -> Response:
        return JSONResponse(standin.received.to_json())

    return app


@contextlib.contextmanager
def run_standin(state_dir: Path) -> Iterator[str]:
    """Serve the stand-in on a free 127.0.0.1 port in a background thread; yield its base URL."""
    standin = OllamaStandin(state_dir)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(standin), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Ollama stand-in did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        standin.close()
