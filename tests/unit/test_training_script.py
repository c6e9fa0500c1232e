"""The training script refuses what it must never load, before loading anything."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, chat_line


class Boom:
    """Unpickling this would create a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (open, (self.marker, "w"))  # noqa: SIM115 - runs only if someone unpickles it


def run(tmp_path: Path, base: str, *extra: str) -> tuple[int, list[dict[str, object]]]:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(chat_line(f"q{i}", f"a{i}") for i in range(12)) + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "--base-model",
            base,
            "--train-file",
            str(data),
            "--output-dir",
            str(tmp_path / "out"),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, events


def test_pickled_weights_are_refused_and_never_loaded(tmp_path: Path) -> None:
    base = tmp_path / "evil-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    marker = tmp_path / "pwned"
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(str(marker))))
    rc, events = run(tmp_path, str(base))
    assert rc == 3
    assert events[-1]["kind"] == "BaseModelError"
    assert "pickled weights (.bin/.pt) are not loaded" in str(events[-1]["message"])
    assert not marker.exists(), "the pickle was loaded"
    assert not (tmp_path / "out").exists()


def test_missing_base_directory_is_a_clear_non_retryable_error(tmp_path: Path) -> None:
    rc, events = run(tmp_path, str(tmp_path / "no-such-base"))
    assert rc == 3
    assert events[-1] == {
        "event": "error",
        "kind": "BaseModelError",
        "message": f"base model directory {tmp_path / 'no-such-base'} does not exist",
    }


def test_out_of_range_hyperparameters_exit_3(tmp_path: Path) -> None:
    rc, events = run(tmp_path, str(tmp_path), "--epochs", "0")
    assert rc == 3 and events[-1]["kind"] == "InvalidHyperparametersError"
    assert "epochs must be between 1 and 100" in str(events[-1]["message"])
