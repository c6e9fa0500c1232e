"""docker-compose.yml, checked statically (no Docker engine runs here): it parses, what it runs
exists in the repo, every variable it sets for our services is a real setting, no port clashes."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenanttune.settings import Settings

REPO = Path(__file__).resolve().parents[2]
OURS = ("api", "worker-deploy", "worker-training", "worker-training-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_it_has_every_part_of_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "postgresql",
        "temporal",
        "temporal-ui",
        "redis",
        "ollama",
        "api",
        "worker-deploy",
        "worker-training",
    } <= set(services)
    assert services["temporal"]["environment"]["DB"].startswith("postgres")
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if name != "temporal-setup":  # a one-shot job
            assert "healthcheck" in service, f"{name} has no health check"


def test_our_services_run_code_that_exists(compose: dict[str, Any]) -> None:
    for name in OURS:
        command = compose["services"][name]["command"]
        if command[0] == "python":
            script = REPO / command[1]
            assert script.is_file(), f"{name}: {script} does not exist"
            if command[1] == "worker.py":
                from worker import parse_queues

                queues = command[command.index("--queues") + 1]
                assert parse_queues(queues), name
        else:
            assert command[0] == "uvicorn", name
            module, attr = command[1].split(":")
            assert attr in ("app",) and hasattr(importlib.import_module(module), "create_app")
    dockerfile = (REPO / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_every_variable_set_for_our_services_is_a_setting(compose: dict[str, Any]) -> None:
    settings = {name.upper() for name in Settings.model_fields}
    for name in OURS:
        env = compose["services"][name]["environment"]
        unknown = set(env) - settings
        assert not unknown, f"{name} sets {unknown}, which no setting reads"
        # And each value is valid for its setting (compose's ${VAR:-default} substituted).
        values = {
            k.lower(): re.sub(r"\$\{[A-Z_]+:[-?]([^}]*)\}", r"\1", str(v)) for k, v in env.items()
        }
        values["jwt_secret"] = "x" * 40
        Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_workers_share_the_models_and_data_volumes_at_one_path(compose: dict[str, Any]) -> None:
    mounts = {name: set(compose["services"][name]["volumes"]) for name in OURS}
    for name, volumes in mounts.items():
        assert {"models:/srv/models", "data:/srv/data"} <= volumes, name
        env = compose["services"][name]["environment"]
        assert env["MODELS_DIR"] == "/srv/models" and env["DATA_DIR"] == "/srv/data", name
    assert {"models", "data"} <= set(compose["volumes"])


def test_training_worker_has_a_gpu_profile_with_the_nvidia_request(
    compose: dict[str, Any],
) -> None:
    training = compose["services"]["worker-training"]
    assert training["profiles"] == ["gpu"]
    device = training["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert training["command"][-1] == "model-training"
    assert compose["services"]["worker-deploy"]["command"][-1] == "model-deployment"
    assert "WORKER_MAX_CONCURRENT_TRAININGS" in training["environment"]


def test_no_two_services_publish_the_same_host_port(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host = str(mapping).rsplit(":", 1)[0]
            assert host not in seen, f"{name} and {seen.get(host)} both publish {host}"
            seen[host] = name


def test_temporal_gets_the_search_attributes_and_matcher_config(compose: dict[str, Any]) -> None:
    from tenanttune.temporal import SEARCH_ATTRIBUTES

    setup = " ".join(compose["services"]["temporal-setup"]["command"])
    for key in SEARCH_ATTRIBUTES:
        assert key.name in setup
    mount = compose["services"]["temporal"]["volumes"][0].split(":")[0]
    config = yaml.safe_load((REPO / mount).read_text())
    assert config["matching.useNewMatcher"][0]["value"] is True


def test_production_is_explicit_and_the_secret_has_no_default(compose: dict[str, Any]) -> None:
    """F9: the image and every service of ours run in production, and nothing supplies a
    JWT_SECRET: compose refuses to start without one (`${JWT_SECRET:?...}`)."""
    for name in OURS:
        env = compose["services"][name]["environment"]
        assert env["ENVIRONMENT"] == "production", name
        assert str(env["JWT_SECRET"]).startswith("${JWT_SECRET:?"), name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^\s+ENVIRONMENT=production", dockerfile, re.MULTILINE)
    assert "JWT_SECRET=" not in dockerfile
    # What the image runs: a bare Settings is production with no secret, so the API refuses.
    bare = Settings(_env_file=None)  # type: ignore[call-arg]
    assert bare.environment == "production" and not bare.jwt_secret


def test_the_image_copies_every_package_it_installs() -> None:
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    copied = {
        line.split()[1]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    assert {pattern.rstrip("*") for pattern in include} <= copied


def test_api_and_workers_agree_on_the_heartbeat_timeouts(compose: dict[str, Any]) -> None:
    """The API stamps the timeouts on each job; a worker sends heartbeats often enough for its
    own settings (worker.py): one value for both, or a busy worker could miss a shorter one."""
    for name in ("TRAIN_HEARTBEAT_TIMEOUT_S", "DEPLOY_HEARTBEAT_TIMEOUT_S"):
        values = {compose["services"][s]["environment"].get(name) for s in OURS}
        assert len(values) == 1 and None not in values, (name, values)


def test_the_training_worker_polls_its_slot_queue(compose: dict[str, Any]) -> None:
    """`--queues model-training` is the job queue and its training slots (worker.py)."""
    from tenanttune.settings import SLOT_QUEUES, TRAINING_QUEUE
    from worker import parse_queues

    for name in ("worker-training", "worker-training-cpu"):
        command = compose["services"][name]["command"]
        assert parse_queues(command[command.index("--queues") + 1]) == [TRAINING_QUEUE]
        slots = compose["services"][name]["environment"]["WORKER_MAX_CONCURRENT_TRAININGS"]
        assert int(re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(slots))) >= 1, name
    assert SLOT_QUEUES[TRAINING_QUEUE] == "model-training-slots"
