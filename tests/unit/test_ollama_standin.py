"""The Ollama stand-in (tests/ollama_standin.py), driven by the official `ollama` client the way
TenantTune's deployment code drives a real Ollama server.

Expected texts and status codes are the real server's (ollama/ollama server/routes.go,
server/create.go, manifest/*.go); the comments name the Go code each assertion mirrors.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import pytest
from fastapi import FastAPI

from tests.ollama_standin import (
    StandinStats,
    TemplateError,
    TemplateUnsupported,
    create_standin_app,
    parse_template,
    render_template,
    run_standin,
)

pytestmark = pytest.mark.timeout(120)

BLOB_NAME = re.compile(r"^sha256-[0-9a-f]{64}$")
FROM_BLOB = re.compile(r"^FROM (\S*/blobs/sha256-([0-9a-f]{64}))$", re.MULTILINE)
MISSING = "sha256:" + "1" * 64


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real F16 GGUF of the tiny Mistral the project builds for tests (about 15 s)."""
    from training.base_model import build_tiny_base
    from training.convert import convert_model

    root = tmp_path_factory.mktemp("ollama-gguf")
    base = build_tiny_base(root / "tiny-base")
    out = root / "tiny-f16.gguf"
    convert_model(base, out, "f16")
    return out


@dataclass
class Standin:
    url: str
    app: FastAPI
    state: Path
    client: ollama.Client

    @property
    def stats(self) -> StandinStats:
        stats: StandinStats = self.app.state.standin.stats
        return stats

    def blobs(self) -> list[str]:
        return sorted(p.name for p in (self.state / "blobs").iterdir())


@contextlib.contextmanager
def _serve(state: Path, **kw: bool) -> Iterator[Standin]:
    app = create_standin_app(state, **kw)
    with run_standin(state, app=app) as url, ollama.Client(host=url) as client:
        yield Standin(url, app, state, client)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Standin]:
    with _serve(tmp_path / "ollama") as served:
        yield served


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def from_blob(modelfile: str) -> tuple[Path, str]:
    """The blob file and digest a `show` modelfile's FROM line names."""
    found = FROM_BLOB.search(modelfile)
    assert found, modelfile
    return Path(found.group(1)), found.group(2)


def error_of(exc: pytest.ExceptionInfo[ollama.ResponseError]) -> tuple[int, str]:
    return exc.value.status_code, exc.value.error


def publish(client: ollama.Client, gguf: Path, name: str, quantize: str | None = None) -> str:
    """What activities/deployment.py does: upload the GGUF, create the model from it."""
    from training import chat

    digest = client.create_blob(gguf)
    done = client.create(
        model=name,
        files={"model.gguf": digest},
        template=chat.OLLAMA_TEMPLATE,
        parameters={"stop": chat.STOP},
        quantize=quantize,
        stream=False,
    )
    assert done.status == "success"
    return digest


# --- the server itself ----------------------------------------------------------------------


def test_root_version_and_unknown_routes(standin: Standin) -> None:
    root = httpx.get(standin.url)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["content-type"].startswith("text/plain")
    assert httpx.head(standin.url).status_code == 200
    version = httpx.get(f"{standin.url}/api/version")
    assert version.status_code == 200 and isinstance(version.json()["version"], str)
    # gin's NoRoute answer, also for a known path with the wrong method.
    for method, path in (("GET", "/api/nothing"), ("GET", "/api/create")):
        missing = httpx.request(method, standin.url + path)
        assert (missing.status_code, missing.text) == (404, "404 page not found")


# --- blobs ----------------------------------------------------------------------------------


def test_create_blob_twice_uploads_once(standin: Standin, tiny_gguf: Path) -> None:
    digest = f"sha256:{sha256_of(tiny_gguf)}"
    head = httpx.head(f"{standin.url}/api/blobs/{digest}")
    assert head.status_code == 404  # HeadBlobHandler: os.Stat fails

    assert standin.client.create_blob(tiny_gguf) == digest
    blob = standin.state / "blobs" / digest.replace(":", "-")
    assert blob.read_bytes() == tiny_gguf.read_bytes()
    mtime = blob.stat().st_mtime_ns
    assert httpx.head(f"{standin.url}/api/blobs/{digest}").status_code == 200
    assert standin.stats.blob_writes == 1
    assert standin.stats.requests[-2][2] == 201  # the upload: 201 Created

    # ollama-python 0.6 sends no HEAD of its own: it POSTs again, and the server answers 200
    # for a blob it has without storing the body (CreateBlobHandler's os.Stat short cut).
    assert standin.client.create_blob(tiny_gguf) == digest
    assert standin.stats.count("POST", "/api/blobs/") == 2
    assert standin.stats.count("HEAD") == 2  # only this test's own
    assert standin.stats.requests[-1] == ("POST", f"/api/blobs/{digest}", 200)
    assert standin.stats.blob_writes == 1
    assert blob.stat().st_mtime_ns == mtime
    assert standin.blobs() == [blob.name]
    stats = httpx.get(f"{standin.url}/_standin/stats").json()
    assert (stats["blob_posts"], stats["blob_writes"], stats["creates"]) == (2, 1, 0)


def test_blob_digest_is_checked(standin: Standin) -> None:
    body = b"not what the digest says"
    real = f"sha256:{hashlib.sha256(body).hexdigest()}"
    claimed = "sha256:" + "0" * 64
    r = httpx.post(f"{standin.url}/api/blobs/{claimed}", content=body)
    assert r.status_code == 400
    assert r.json() == {"error": f'digest mismatch, expected "{claimed}", got "{real}"'}
    assert httpx.head(f"{standin.url}/api/blobs/{claimed}").status_code == 404
    # NewLayer stores the body under its real digest before the handler compares digests,
    # so the real server keeps it too; no temporary file is left behind.
    assert httpx.head(f"{standin.url}/api/blobs/{real}").status_code == 200
    assert all(BLOB_NAME.match(name) for name in standin.blobs())

    for bad in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + "0" * 63):
        for method in ("HEAD", "POST"):
            r = httpx.request(method, f"{standin.url}/api/blobs/{bad}", content=b"x")
            assert r.status_code == 400, (method, bad)
            if method == "POST":
                assert r.json() == {"error": "invalid digest format"}  # BlobsPath


# --- create: refusals -----------------------------------------------------------------------


def test_create_refusals(standin: Standin, tiny_gguf: Path) -> None:
    client, state = standin.client, standin.state
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", files={"model.gguf": MISSING}, stream=False)
    # ggufLayers opens the blob after "parsing GGUF"; the os.Open error has no status: 500.
    missing_path = state / "blobs" / MISSING.replace(":", "-")
    assert error_of(exc) == (500, f"open {missing_path}: no such file or directory")

    # Streaming, the same error comes as an NDJSON line after the first progress message.
    statuses: list[str | None] = []
    with pytest.raises(ollama.ResponseError) as exc:
        for progress in client.create(model="m", files={"model.gguf": MISSING}, stream=True):
            statuses.append(progress.status)
    assert statuses == ["parsing GGUF"]
    assert exc.value.error.startswith("open ") and exc.value.status_code == -1

    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", stream=False)
    assert error_of(exc) == (400, "neither 'from' or 'files' was specified")

    digest = client.create_blob(tiny_gguf)
    for name in ("bad name!", "a/b/c/d/e", "-leading-dash"):
        with pytest.raises(ollama.ResponseError) as exc:
            client.create(model=name, files={"model.gguf": digest}, stream=False)
        assert error_of(exc) == (400, "invalid model name"), name
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", files={"../model.gguf": digest}, stream=False)
    assert error_of(exc) == (400, "file path must be relative")

    notes = state.parent / "notes.txt"
    notes.write_text("plain text, not a model\n")
    text_digest = client.create_blob(notes)
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", files={"notes.gguf": text_digest}, stream=False)
    assert error_of(exc) == (400, "supplied file was not in GGUF format")
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", files={"notes.txt": text_digest}, stream=False)
    assert error_of(exc) == (400, "unknown type")

    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="m", files={"model.gguf": digest}, template="{{ if .System }}")
    status, message = error_of(exc)
    assert status == 400 and message.startswith("template error: ")

    no_body = httpx.post(f"{standin.url}/api/create")
    assert (no_body.status_code, no_body.json()) == (400, {"error": "missing request body"})
    no_name = httpx.post(f"{standin.url}/api/create", json={"files": {"model.gguf": digest}})
    assert (no_name.status_code, no_name.json()) == (400, {"error": "invalid model name"})
    assert client.list().models == []


# --- the publish / verify / unpublish round trip --------------------------------------------


def test_create_list_show_generate_delete(standin: Standin, tiny_gguf: Path) -> None:
    from training import chat

    client = standin.client
    digest = client.create_blob(tiny_gguf)
    hex_digest = digest.removeprefix("sha256:")
    progress = list(
        client.create(
            model="Tenant-A",
            files={"model.gguf": digest},
            template=chat.OLLAMA_TEMPLATE,
            parameters={"stop": chat.STOP, "temperature": 0},
            system="You answer warehouse questions.",
            stream=True,
        )
    )
    statuses = [p.status or "" for p in progress]
    assert statuses[:2] == ["parsing GGUF", f"using existing layer {digest}"]
    assert len(statuses) == 7 and all(
        s.startswith("creating new layer sha256:") for s in statuses[2:5]
    )
    assert statuses[-2:] == ["writing manifest", "success"]

    # The name keeps the case it was created with; lookups ignore case (getExistingName).
    manifest = standin.state / "manifests/registry.ollama.ai/library/Tenant-A/latest"
    [listed] = client.list().models
    assert listed.model == "Tenant-A:latest"
    assert listed.digest == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert listed.size is not None and listed.size > tiny_gguf.stat().st_size
    assert listed.details is not None
    assert (listed.details.format, listed.details.family) == ("gguf", "llama")
    assert listed.details.families == ["llama"]
    assert listed.details.quantization_level == "F16"
    assert listed.details.parameter_size and listed.details.parameter_size.endswith("K")

    shown = client.show("tenant-a")
    blob, named = from_blob(shown.modelfile or "")
    assert named == hex_digest and blob == standin.state / "blobs" / f"sha256-{hex_digest}"
    assert blob.is_file()
    assert shown.template == chat.OLLAMA_TEMPLATE
    assert "\nSYSTEM You answer warehouse questions.\n" in (shown.modelfile or "")
    raw = httpx.post(f"{standin.url}/api/show", json={"model": "tenant-a"}).json()
    assert raw["system"] == "You answer warehouse questions."  # not in the client's model
    assert f'{"stop":<30} "{chat.STOP[0]}"' in (shown.parameters or "")
    assert f"{'temperature':<30} 0" in (shown.parameters or "")
    assert shown.details is not None and shown.details.quantization_level == "F16"
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # arrays over 5 long, unless verbose
    assert shown.capabilities == ["completion"]

    # What _verify_ollama asks: a real answer from the GGUF, with Ollama's metrics.
    answer = client.generate(
        model="tenant-a",
        prompt="Where is pallet GX-48213?",
        system="",
        stream=False,
        options={"num_predict": 16, "temperature": 0},
    )
    assert answer.done is True and answer.done_reason in ("stop", "length")
    assert answer.response and answer.response.strip()
    assert answer.model == "tenant-a"
    assert answer.eval_count and 0 < answer.eval_count <= 16
    assert answer.prompt_eval_count and answer.prompt_eval_count > 5
    for metric in ("total_duration", "load_duration", "eval_duration", "prompt_eval_duration"):
        assert isinstance(answer[metric], int) and answer[metric] > 0, metric
    assert (answer.total_duration or 0) >= (answer.eval_duration or 0)
    assert answer.context

    again = client.generate(
        model="Tenant-A",
        prompt="Where is pallet GX-48213?",
        options={"num_predict": 16, "temperature": 0},
    )
    assert again.response == answer.response  # greedy is deterministic

    chunks = list(
        client.generate(model="tenant-a", prompt="Hello", stream=True, options={"num_predict": 8})
    )
    assert chunks[-1].done is True and all(c.done is False for c in chunks[:-1])
    assert chunks[-1].eval_count and chunks[-1].eval_count <= 8
    assert "".join(c.response or "" for c in chunks)

    loaded = client.generate(model="tenant-a", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")

    # _unpublish_ollama: delete, after which show is a 404.
    assert client.delete("TENANT-A").status == "success"
    with pytest.raises(ollama.ResponseError) as exc:
        client.show("tenant-a")
    assert error_of(exc) == (404, "model 'tenant-a:latest' not found")
    with pytest.raises(ollama.ResponseError) as exc:
        client.delete("tenant-a")
    assert error_of(exc) == (404, "model 'tenant-a' not found")
    assert client.list().models == []
    # DeleteHandler also removes the layers no other model uses (Manifest.RemoveLayers),
    # the uploaded GGUF included: a later publish must upload it again.
    assert not blob.exists() and standin.blobs() == []
    head = httpx.head(f"{standin.url}/api/blobs/{digest}")
    assert head.status_code == 404


def test_generate_refusals(standin: Standin, tiny_gguf: Path) -> None:
    publish(standin.client, tiny_gguf, "m")
    with pytest.raises(ollama.ResponseError) as exc:
        standin.client.generate(model="nope", prompt="hi")
    assert error_of(exc) == (404, "model 'nope' not found")
    # GenerateHandler treats a missing model as not found (routes_generate_test.go).
    for body in ({"prompt": "hi"}, {"model": "", "prompt": "hi"}):
        r = httpx.post(f"{standin.url}/api/generate", json=body)
        assert (r.status_code, r.json()) == (404, {"error": "model '' not found"})
    r = httpx.post(f"{standin.url}/api/generate", json={"model": "bad name!", "prompt": "x"})
    assert (r.status_code, r.json()) == (400, {"error": "invalid model name"})
    with pytest.raises(ollama.ResponseError) as exc:
        standin.client.generate(model="m", prompt="hi", raw=True, system="s")
    assert error_of(exc) == (400, "raw mode does not support template, system, or context")
    raw = standin.client.generate(
        model="m", prompt="[INST] hi [/INST]", raw=True, options={"num_predict": 4}
    )
    assert raw.done is True and raw.context is None  # no context in raw mode


def test_generate_limits_and_stops(standin: Standin, tiny_gguf: Path) -> None:
    publish(standin.client, tiny_gguf, "m")
    greedy = {"temperature": 0, "num_predict": 12, "stop": []}  # a request stop replaces PARAMETERs
    full = standin.client.generate(model="m", prompt="Where is my order?", options=greedy)
    assert full.done_reason == "length" and full.eval_count == 12
    text = full.response or ""
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = text[: text.find(stop)]

    stopped = standin.client.generate(
        model="m", prompt="Where is my order?", options=greedy | {"stop": [stop]}
    )
    assert (stopped.response, stopped.done_reason) == (cut, "stop")
    streamed = list(
        standin.client.generate(
            model="m", prompt="Where is my order?", options=greedy | {"stop": [stop]}, stream=True
        )
    )
    assert "".join(c.response or "" for c in streamed) == cut  # nothing past the stop leaks
    assert streamed[-1].done_reason == "stop"

    with pytest.raises(ollama.ResponseError) as exc:
        standin.client.generate(model="m", prompt="x", options={"stop": "x"})
    assert error_of(exc) == (500, 'option "stop" must be of type array')  # Options.FromMap


# --- quantize -------------------------------------------------------------------------------


def test_create_quantized(standin: Standin, tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    client = standin.client
    uploaded = publish(client, tiny_gguf, "tenant-q8", quantize="q8_0")
    shown = client.show("tenant-q8")
    assert shown.details is not None and shown.details.quantization_level == "Q8_0"
    blob, named = from_blob(shown.modelfile or "")
    assert f"sha256:{named}" != uploaded  # the quantized GGUF is a blob of its own
    assert sha256_of(blob) == named
    file_type = GGUFReader(str(blob)).get_field("general.file_type")
    assert file_type is not None and file_type.contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    answer = client.generate(model="tenant-q8", prompt="Hi", options={"num_predict": 4})
    assert answer.done is True and answer.eval_count

    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="x", files={"model.gguf": uploaded}, quantize="q5_K_M")
    assert error_of(exc) == (
        500,
        "unsupported quantization type Q5_K_M - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0",
    )
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="x", files={"model.gguf": f"sha256:{named}"}, quantize="q4_K_M")
    assert error_of(exc) == (500, "quantization is only supported for F16, BF16 and F32 models")


def test_newer_ollama_rewrites_the_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    """Ollama >= 0.30 runs every created GGUF through llama-quantize COPY: FROM then names a
    new blob, not the uploaded one."""
    with _serve(tmp_path / "ollama", validate_gguf_on_create=True) as standin:
        uploaded = publish(standin.client, tiny_gguf, "m")
        _, named = from_blob(standin.client.show("m").modelfile or "")
        assert f"sha256:{named}" != uploaded
        assert standin.client.generate(model="m", prompt="Hi", options={"num_predict": 2}).done


# --- templates ------------------------------------------------------------------------------


def test_template_rendering() -> None:
    from training import chat

    production = parse_template(chat.OLLAMA_TEMPLATE)
    assert render_template(production, system="Be brief.", prompt="Hi?") == (
        "[INST] Be brief.\n\nHi? [/INST] "
    )
    assert render_template(production, prompt="Hi?") == "[INST] Hi? [/INST] "

    # No .Response: Ollama appends one, so the whole template is the prompt.
    zephyr = parse_template(
        "{{ if .System }}<|system|>\n{{ .System }}</s>\n{{ end }}<|user|>\n{{ .Prompt }}</s>\n"
        "<|assistant|>\n"
    )
    assert render_template(zephyr, prompt="hi") == "<|user|>\nhi</s>\n<|assistant|>\n"
    # Everything after the first .Response goes (template.go deleteNode), inside ifs too.
    assert render_template(parse_template("{{ .Prompt }}:{{ .Response }}</s>"), prompt="p") == "p:"
    assert render_template(parse_template("{{ if .System }}{{ .Response }}{{ end }}X")) == ""
    # Trim markers, comments, else-if and functions.
    tricky = parse_template(
        "{{- /* c */ -}}\n  A {{- if and .System (not .Prompt) }}x"
        '{{ else if eq .Prompt "q" }}[{{ .Prompt }}]{{ else }}z{{ end -}}  \n B'
    )
    assert render_template(tricky, prompt="q") == "A[q]B"
    assert render_template(tricky, prompt="r") == "AzB"
    assert render_template(tricky, system="s") == "AxB"

    for bad in ("{{ if .System }}", "{{ end }}", "{{ nosuch .X }}", "{{ .X"):
        with pytest.raises(TemplateError):
            parse_template(bad)
    for beyond in ("{{ range .Messages }}{{ end }}", "{{ $x := 1 }}", "{{ json .X }}"):
        with pytest.raises(TemplateUnsupported):
            parse_template(beyond)
