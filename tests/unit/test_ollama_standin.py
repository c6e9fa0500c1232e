"""The Ollama stand-in, driven by the official `ollama` client the way activities/deployment.py
drives a real Ollama server. Status codes and error texts are the real server's
(ollama/ollama server/routes.go, server/create.go)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest

from tests.ollama_standin import _render, run_standin
from training import chat

pytestmark = pytest.mark.timeout(180)

ASK: dict[str, Any] = {
    "prompt": "How do I export invoices?",
    "options": {"num_predict": 8, "temperature": 0},
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real F16 GGUF of the tiny Mistral the project builds for tests."""
    from training.base_model import build_tiny_base
    from training.convert import convert_model

    root = tmp_path_factory.mktemp("ollama-gguf")
    out = root / "tiny-f16.gguf"
    convert_model(build_tiny_base(root / "base"), out, "f16")
    return out


@dataclass
class Standin:
    url: str
    blobs: Path
    client: ollama.Client

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/_standin/stats").json())

    def has_blob(self, digest: str) -> bool:
        return httpx.head(f"{self.url}/api/blobs/{digest}").status_code == 200

    def blob(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Standin]:
    with run_standin(tmp_path / "ollama") as url, ollama.Client(host=url) as client:
        yield Standin(url, tmp_path / "ollama" / "blobs", client)


def publish(standin: Standin, gguf: Path, name: str, **create: Any) -> str:
    """What _publish_ollama sends: the GGUF unless Ollama has it, then `create` from it."""
    digest = f"sha256:{hashlib.sha256(gguf.read_bytes()).hexdigest()}"
    if not standin.has_blob(digest):
        assert standin.client.create_blob(gguf) == digest
    done = standin.client.create(
        model=name,
        files={"model.gguf": digest},
        template=chat.OLLAMA_TEMPLATE,
        parameters={"stop": chat.STOP},
        stream=False,
        **create,
    )
    assert done.status == "success"
    return digest


def refused(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ollama.ResponseError) as exc:
        call()
    return exc.value.status_code, exc.value.error


def test_blob_is_stored_once_and_checked(standin: Standin, tiny_gguf: Path) -> None:
    digest = f"sha256:{hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}"
    assert not standin.has_blob(digest)
    assert standin.client.create_blob(tiny_gguf) == digest
    assert standin.blob(digest).read_bytes() == tiny_gguf.read_bytes()
    assert standin.has_blob(digest)
    # A blob it has: 200, the body unread (CreateBlobHandler's os.Stat short cut).
    again = httpx.post(f"{standin.url}/api/blobs/{digest}", content=b"ignored")
    assert again.status_code == 200
    assert {k: standin.stats()[k] for k in ("blob_posts", "blob_writes")} == {
        "blob_posts": 2,
        "blob_writes": 1,
    }

    body = b"not what the digest says"
    claimed, real = "sha256:" + "0" * 64, f"sha256:{hashlib.sha256(body).hexdigest()}"
    wrong = httpx.post(f"{standin.url}/api/blobs/{claimed}", content=body)
    assert (wrong.status_code, wrong.json()) == (
        400,
        {"error": f'digest mismatch, expected "{claimed}", got "{real}"'},
    )
    for method in ("HEAD", "POST"):
        assert httpx.request(method, f"{standin.url}/api/blobs/sha256:xyz").status_code == 400


def test_publish_verify_and_roll_back(standin: Standin, tiny_gguf: Path) -> None:
    client = standin.client
    # _ollama_blob_of: a name not there yet is a 404, named as Ollama displays it.
    assert refused(lambda: client.show("tenant-a")) == (404, "model 'tenant-a:latest' not found")
    digest = publish(standin, tiny_gguf, "tenant-a:1")

    [listed] = client.list().models
    assert listed.model == "tenant-a:1" and listed.size == tiny_gguf.stat().st_size
    assert listed.details is not None
    assert (listed.details.format, listed.details.family) == ("gguf", "llama")
    assert listed.details.quantization_level == "F16"

    shown = client.show("Tenant-A:1")  # names ignore case
    assert f"\nFROM {standin.blob(digest)}\n" in (shown.modelfile or "")
    assert shown.template == chat.OLLAMA_TEMPLATE
    assert f'{"stop":<30} "{chat.STOP[0]}"' in (shown.parameters or "")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"

    # _verify_ollama: a real answer from the GGUF, with the metrics it reads.
    answer = client.generate(model="tenant-a:1", system="", stream=False, **ASK)
    assert answer.done is True and answer.done_reason in ("stop", "length")
    assert answer.response and answer.response.strip()
    assert answer.eval_count and 0 < answer.eval_count <= 8
    assert answer.prompt_eval_count and answer.prompt_eval_count > 5
    assert (answer.total_duration or 0) >= (answer.eval_duration or 0) > 0
    # Without "stream": false Ollama streams NDJSON; greedy decoding gives the same text.
    chunks = list(client.generate(model="tenant-a:1", stream=True, **ASK))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.response or "" for c in chunks) == answer.response

    # _unpublish_ollama; the blobs no other model uses go with it, so a publish uploads again.
    assert client.delete("tenant-a:1").status == "success"
    assert refused(lambda: client.show("tenant-a:1"))[0] == 404
    assert refused(lambda: client.delete("tenant-a:1")) == (404, "model 'tenant-a:1' not found")
    assert client.list().models == [] and not standin.has_blob(digest)


def test_template_renders_as_ollama_renders_it() -> None:
    assert _render(chat.OLLAMA_TEMPLATE, "Be brief.", "Hi?") == "[INST] Be brief.\n\nHi? [/INST] "
    assert _render(chat.OLLAMA_TEMPLATE, "", "Hi?") == "[INST] Hi? [/INST] "


def test_create_progress_and_refusals(standin: Standin, tiny_gguf: Path, tmp_path: Path) -> None:
    client = standin.client
    digest = client.create_blob(tiny_gguf)
    created = client.create(model="m", files={"model.gguf": digest}, stream=True)
    assert [p.status for p in created] == ["parsing GGUF", "writing manifest", "success"]

    missing = "sha256:" + "1" * 64
    # ggufLayers' os.Open error carries no status: 500; streamed, it follows a progress line.
    assert refused(lambda: client.create(model="m", files={"m.gguf": missing}, stream=False)) == (
        500,
        f"open {standin.blob(missing)}: no such file or directory",
    )
    with pytest.raises(ollama.ResponseError) as exc:
        list(client.create(model="m", files={"m.gguf": missing}, stream=True))
    assert exc.value.status_code == -1 and exc.value.error.startswith("open ")

    notes = tmp_path / "notes.txt"
    notes.write_text("plain text, not a model\n")
    text = client.create_blob(notes)
    bad_files: list[tuple[dict[str, str] | None, str]] = [
        ({"notes.gguf": text}, "supplied file was not in GGUF format"),
        ({"notes.txt": text}, "unknown type"),
        ({"../m.gguf": digest}, "file path must be relative"),
        (None, "neither 'from' or 'files' was specified"),
    ]
    for files, error in bad_files:
        assert refused(functools.partial(client.create, model="m", files=files)) == (400, error)
    assert refused(lambda: client.create(model="bad name!", files={"m.gguf": digest})) == (
        400,
        "invalid model name",
    )
    # What the stand-in cannot do faithfully it refuses, rather than answer wrongly.
    loop = "{{ range .Messages }}{{ .Content }}{{ end }}"
    assert (
        refused(lambda: client.create(model="m", files={"m.gguf": digest}, template=loop))[0] == 501
    )
    assert refused(lambda: client.create(model="m", files={"m.gguf": digest}, license="MIT")) == (
        501,
        "ollama stand-in: license not implemented",
    )
    assert refused(lambda: client.generate(model="m", prompt="hi", raw=True))[0] == 501
    assert refused(lambda: client.generate(model="nope", prompt="hi")) == (
        404,
        "model 'nope' not found",
    )
    chat_call = httpx.post(f"{standin.url}/api/chat", json={"model": "m"})
    assert (chat_call.status_code, chat_call.text) == (404, "404 page not found")


def test_quantize_makes_a_new_blob(standin: Standin, tiny_gguf: Path) -> None:
    """Ollama's llama-quantize writes a new GGUF: `show` no longer names the uploaded blob,
    which is why _publish_ollama keeps a marker of its own create."""
    # Not q8_0 or q4_K_M: llama-cpp-python 0.3.36 segfaults decoding those of the tiny model.
    uploaded = publish(standin, tiny_gguf, "tenant-q", quantize="q4_K_S")
    shown = standin.client.show("tenant-q")
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_S"
    assert str(standin.blob(uploaded)) not in (shown.modelfile or "")
    assert standin.client.generate(model="tenant-q", **ASK).eval_count
    assert refused(lambda: publish(standin, tiny_gguf, "x", quantize="q5_K_M")) == (
        500,
        "unsupported quantization type Q5_K_M - supported types are F32, F16, Q4_K_S, Q4_K_M, Q8_0",
    )


def lora_gguf(path: Path, base: Path) -> Path:
    """A LoRA adapter GGUF for the tiny model, laid out as llama.cpp's convert_lora_to_gguf
    writes one (general.type=adapter, A and B per target), with random weights."""
    from gguf import GGUFReader, GGUFWriter

    target = next(t for t in GGUFReader(base).tensors if t.name == "blk.0.attn_q.weight")
    n_in, n_out = (int(n) for n in target.shape[:2])  # GGUF order: the input first
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_tensor(f"{target.name}.lora_a", rng.normal(size=(8, n_in)).astype(np.float32))
    writer.add_tensor(f"{target.name}.lora_b", rng.normal(size=(n_out, 8)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_adapter_on_a_shared_base(standin: Standin, tiny_gguf: Path, tmp_path: Path) -> None:
    """`create` from a base already there plus a LoRA adapter: the deployment path to come."""
    client = standin.client
    base = publish(standin, tiny_gguf, "tiny-base")
    adapter = client.create_blob(lora_gguf(tmp_path / "lora.gguf", tiny_gguf))
    done = client.create(
        model="tenant-b:1", from_="tiny-base", adapters={"lora.gguf": adapter}, stream=False
    )
    assert done.status == "success"
    # What a test of the deployment code can check it sent.
    assert standin.stats()["create_requests"][-1] == {
        "model": "tenant-b:1",
        "from": "tiny-base",
        "adapters": {"lora.gguf": adapter},
        "stream": False,
    }

    shown = client.show("tenant-b:1")
    assert f"\nFROM {standin.blob(base)}\nADAPTER {standin.blob(adapter)}\n" in (
        shown.modelfile or ""
    )
    assert shown.template == chat.OLLAMA_TEMPLATE  # the base's
    assert shown.details is not None and shown.details.parent_model == "tiny-base:latest"
    # llama.cpp applies the adapter: greedy answers differ from the base's.
    with_adapter = client.generate(model="tenant-b:1", **ASK).response
    assert with_adapter != client.generate(model="tiny-base", **ASK).response

    two = {"a.gguf": adapter, "b.gguf": adapter}
    assert refused(lambda: client.create(model="x", from_="tiny-base", adapters=two)) == (
        400,
        "only one adapter is currently supported",
    )
    assert refused(lambda: client.create(model="x", from_="elsewhere"))[0] == 500  # no pull here

    # The tenant's model goes; the shared base and its blob stay.
    client.delete("tenant-b:1")
    assert standin.has_blob(base) and not standin.has_blob(adapter)
    assert [m.model for m in client.list().models] == ["tiny-base:latest"]
