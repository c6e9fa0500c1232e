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


def run(tmp_path: Path, base: str, **config: object) -> tuple[int, list[dict[str, object]]]:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(chat_line(f"q{i}", f"a{i}") for i in range(12)) + "\n")
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(
            {"base_model": base, "train_file": str(data), "output_dir": str(tmp_path / "out")}
            | config
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(config_file)],
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
    rc, events = run(tmp_path, str(tmp_path), hyperparameters={"epochs": 0})
    assert rc == 3 and events[-1]["kind"] == "InvalidHyperparametersError"
    assert "epochs must be at least 1 (got 0)" in str(events[-1]["message"])


def test_unknown_config_keys_exit_3(tmp_path: Path) -> None:
    rc, events = run(tmp_path, str(tmp_path), epochs=3)
    assert rc == 3 and events[-1]["kind"] == "InvalidHyperparametersError"
    assert "unknown config keys: ['epochs']" in str(events[-1]["message"])


def test_the_spec_is_the_api_schema_and_the_script_bounds() -> None:
    """One spec: the API's JSON schema shows the same bounds and defaults the script checks."""
    from api.schemas import TrainBody
    from training.spec import TrainingHyperparameters

    schema = TrainBody.model_json_schema()["properties"]
    assert schema["epochs"]["maximum"] == 50 and schema["epochs"]["default"] == 3
    assert schema["learningRate"]["exclusiveMinimum"] == 0
    assert schema["maxSeqLength"]["minimum"] == 32
    too_many = TrainingHyperparameters(epochs=51, learning_rate=0.5)
    assert too_many.problems() == [
        "epochs must be at most 50 (got 51)",
        "learningRate must be at most 0.01 (got 0.5)",
    ]
    body = TrainBody.model_validate({"epochs": 7, "loraRank": 4})
    assert body.hyperparameters() == TrainingHyperparameters(epochs=7, lora_r=4)
