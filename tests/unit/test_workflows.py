"""TrainingWorkflow and DeploymentWorkflow in Temporal's time-skipping test server.

Every activity is stood in by name, so these tests pin what the workflows do with the answers
they get: the order of the steps and what each one receives, retries and timeouts (in seconds of
skipped time), the pause gate, rollback, cancel, the child deployment, the `progress` query, and
the Bull-style status updates sent to `record_status`. Only the public surface is used: the run
input and result, the query, the `release` signal and the activities' names and inputs.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tenanttune.errors import NON_RETRYABLE_ERRORS
from tenanttune.settings import DEPLOYMENT_QUEUE, TRAINING_QUEUE, slots_queue
from tenanttune.temporal import SEARCH_ATTRIBUTES
from tenanttune.types import (
    ConvertRequest,
    ConvertResult,
    DeployRequest,
    DeployResult,
    ExportRequest,
    ExportResult,
    JobOptions,
    JobProgress,
    PublishRequest,
    PublishResult,
    RegisterModelRequest,
    StatusUpdate,
    TrainModelRequest,
    TrainModelResult,
    TrainRequest,
    TrainResult,
    VerifyRequest,
    VerifyResult,
)
from workflows.deployment import DeploymentWorkflow
from workflows.training import TrainingWorkflow

pytestmark = pytest.mark.timeout(60)

TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"
BASE = "tiny-mistral"


async def start_test_server() -> WorkflowEnvironment:
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER))
    # Without them the test server never starts the auto-deploy child (it rejects its search
    # attributes, and the training job waits on the child for ever).
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={key.name: key.indexed_value_type for key in SEARCH_ATTRIBUTES},
        )
    )
    return env


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_test_server()
    yield env
    await env.shutdown()


@pytest.fixture
async def own_env() -> AsyncIterator[WorkflowEnvironment]:
    """A test server of the test's own, for a test that upsets time skipping for the tests after
    it: seen with test server 1.40, a workflow that closes while an activity is still running
    leaves time skipping locked for good."""
    env = await start_test_server()
    yield env
    await env.shutdown()


@dataclass
class Call:
    name: str
    arg: Any
    attempt: int
    at: datetime  # the test server's clock, which skips


Behaviour = Callable[[Any], Awaitable[Any]]


class StandIns:
    """Every activity the workflows call, registered under its real name.

    Records each call (and each status update) and answers with a plausible result, or with
    what a test put in `behave[name]` (an async function of the input; None keeps the default).
    """

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env
        self.calls: list[Call] = []
        self.statuses: list[StatusUpdate] = []
        self.paused = False  # what queue_paused answers
        self.behave: dict[str, Behaviour] = {}

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.record_status,
            self.queue_paused,
            self.admit_child_job,
            self.export_training_data,
            self.train_model,
            self.register_model,
            self.convert_to_gguf,
            self.deploy_model,
            self.verify_deployment,
            self.unpublish_model,
            self.withdraw_publication,
            self.finish_publish,
        ]

    def steps(self) -> list[str]:
        """The names of the calls, leaving out the mirror writes."""
        return [c.name for c in self.calls if c.name != "record_status"]

    def called(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    def states(self) -> list[str]:
        return [s.state for s in self.statuses]

    async def _answer(self, name: str, arg: Any, default: Any) -> Any:
        info = activity.info()
        self.calls.append(Call(name, arg, info.attempt, await self.env.get_current_time()))
        behaviour = self.behave.get(name)
        answer = await behaviour(arg) if behaviour else None
        return default if answer is None else answer

    @activity.defn(name="record_status")
    async def record_status(self, update: StatusUpdate) -> bool:
        self.statuses.append(update)
        return bool(await self._answer("record_status", update, True))

    @activity.defn(name="queue_paused")
    async def queue_paused(self, queue: str) -> bool:
        return bool(await self._answer("queue_paused", queue, self.paused))

    @activity.defn(name="export_training_data")
    async def export_training_data(self, req: ExportRequest) -> ExportResult:
        run = f"/data/runs/{req.job_id}"
        result = ExportResult(
            train_path=f"{run}/train.jsonl",
            validation_path=f"{run}/validation.jsonl",
            dataset_size=120,
            validation_size=12,
            quality_score=0.9,
            dataset_sha256="ab" * 32,
        )
        answer: ExportResult = await self._answer("export_training_data", req, result)
        return answer

    @activity.defn(name="train_model")
    async def train_model(self, req: TrainModelRequest) -> TrainModelResult:
        result = TrainModelResult(
            adapter_path=f"/runs/{req.job_id}/attempt-{activity.info().attempt}",
            base_model=BASE,
            metrics={"train_loss": 1.25},
        )
        answer: TrainModelResult = await self._answer("train_model", req, result)
        return answer

    @activity.defn(name="register_model")
    async def register_model(self, req: RegisterModelRequest) -> TrainResult:
        result = TrainResult(
            model_path=f"/models/{req.company_id}/{req.version}",
            version=req.version,
            base_model=req.base_model,
            metrics=req.metrics,
            dataset_size=req.export.dataset_size,
            quality_score=req.export.quality_score,
            base_short_name=BASE,
        )
        answer: TrainResult = await self._answer("register_model", req, result)
        return answer

    @activity.defn(name="convert_to_gguf")
    async def convert_to_gguf(self, req: ConvertRequest) -> ConvertResult:
        result = ConvertResult(
            gguf_path=f"{req.model_path}/model-{req.outtype}.gguf",
            sha256="cd" * 32,
            size=4096,
            architecture="llama",
            tensor_count=21,
            vocab_size=300,
            converted=True,
        )
        answer: ConvertResult = await self._answer("convert_to_gguf", req, result)
        return answer

    @activity.defn(name="deploy_model")
    async def deploy_model(self, req: PublishRequest) -> PublishResult:
        result = PublishResult(
            model_name=req.model_name,
            target=req.target,
            location=f"/models/registry/{req.model_name}",
            digest=f"sha256:{req.gguf.sha256}",
            created=True,
        )
        answer: PublishResult = await self._answer("deploy_model", req, result)
        return answer

    @activity.defn(name="verify_deployment")
    async def verify_deployment(self, req: VerifyRequest) -> VerifyResult:
        result = VerifyResult(
            prompt="What do you sell?", text="Anvils.", tokens=3, latency_s=0.1, tokens_per_s=30.0
        )
        answer: VerifyResult = await self._answer("verify_deployment", req, result)
        return answer

    @activity.defn(name="unpublish_model")
    async def unpublish_model(self, published: PublishResult) -> None:
        await self._answer("unpublish_model", published, None)

    @activity.defn(name="admit_child_job")
    async def admit_child_job(self, company_id: str) -> None:
        await self._answer("admit_child_job", company_id, None)

    @activity.defn(name="withdraw_publication")
    async def withdraw_publication(self, req: PublishRequest) -> bool:
        answer: bool = await self._answer("withdraw_publication", req, True)
        return answer

    @activity.defn(name="finish_publish")
    async def finish_publish(self, published: PublishResult) -> None:
        await self._answer("finish_publish", published, None)


@pytest.fixture
def acts(env: WorkflowEnvironment) -> StandIns:
    return StandIns(env)


@pytest.fixture
def queue() -> str:
    return f"test-{uuid.uuid4()}"


@asynccontextmanager
async def workers(env: WorkflowEnvironment, acts: StandIns, *queues: str) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for q in queues:
            worker = Worker(
                env.client,
                task_queue=q,
                workflows=[TrainingWorkflow, DeploymentWorkflow],
                activities=acts.all(),
            )
            await stack.enter_async_context(worker)
            # train_model runs on the queue's slot queue, polled only by workers with a free slot.
            slots = Worker(env.client, task_queue=slots_queue(q), activities=[acts.train_model])
            await stack.enter_async_context(slots)
        yield


def train_request(**fields: Any) -> TrainRequest:
    return TrainRequest(job_id=f"train-acme-{uuid.uuid4().hex[:16]}", company_id="acme", **fields)


def deploy_request(**fields: Any) -> DeployRequest:
    return DeployRequest(
        job_id=f"deploy-acme-{uuid.uuid4().hex[:16]}",
        company_id="acme",
        model_path="/models/acme/1.0",
        version="1.0",
        model_name=f"{BASE}-company-acme:1.0",
        **fields,
    )


async def start_training(
    env: WorkflowEnvironment, queue: str, req: TrainRequest
) -> WorkflowHandle[Any, TrainResult]:
    return await env.client.start_workflow(
        TrainingWorkflow.run, req, id=req.job_id, task_queue=queue
    )


async def until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout_s` seconds of real time."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


async def server_has_heartbeat(env: WorkflowEnvironment, workflow_id: str) -> None:
    """Wait until the server holds a heartbeat of the workflow's running activity (the SDK
    sends heartbeats in the background)."""
    handle = env.client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + 10
    while True:
        pending = (await handle.describe()).raw_description.pending_activities
        if any(p.HasField("heartbeat_details") for p in pending):
            return
        assert time.monotonic() < deadline, "the heartbeat never reached the server"
        await asyncio.sleep(0.02)


def seconds(earlier: Call, later: Call) -> float:
    return (later.at - earlier.at).total_seconds()


async def failure_of(handle: WorkflowHandle[Any, Any]) -> BaseException:
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert failed.value.cause is not None
    return failed.value.cause


def retryable(message: str) -> Behaviour:
    async def fail(_: Any) -> None:
        raise ApplicationError(message, type="DiskFullError")

    return fail


# --- training ---------------------------------------------------------------------------------


async def test_training_exports_trains_registers_and_reports_each_state(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    gate_open = asyncio.Event()

    async def slow_gate(_: str) -> None:
        await gate_open.wait()

    acts.behave["queue_paused"] = slow_gate
    req = train_request(version="1.0", base_model="", save_steps=7)
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, req)
        await until(lambda: bool(acts.called("queue_paused")), "the pause gate's check")
        # Before the gate lets it through, the job says it is waiting.
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("waiting", 0.0)
        gate_open.set()
        result = await handle.result()
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("completed", 100.0)

    assert acts.steps() == ["queue_paused", "export_training_data", "train_model", "register_model"]
    assert acts.called("queue_paused")[0].arg == TRAINING_QUEUE
    export = acts.called("export_training_data")[0].arg
    assert (export.job_id, export.company_id) == (req.job_id, "acme")
    train = acts.called("train_model")[0].arg
    assert (train.train_path, train.validation_path) == (
        f"/data/runs/{req.job_id}/train.jsonl",
        f"/data/runs/{req.job_id}/validation.jsonl",
    )
    assert (train.job_id, train.save_steps, train.hyperparameters) == (
        req.job_id,
        7,
        req.hyperparameters,
    )
    register = acts.called("register_model")[0].arg
    assert register.adapter_path == f"/runs/{req.job_id}/attempt-1"
    assert (register.version, register.base_model, register.metrics) == (
        "1.0",
        BASE,
        {"train_loss": 1.25},
    )
    assert register.export.dataset_sha256 == "ab" * 32

    assert result == TrainResult(
        model_path="/models/acme/1.0",
        version="1.0",
        base_model=BASE,
        metrics={"train_loss": 1.25},
        dataset_size=120,
        quality_score=0.9,
        base_short_name=BASE,
    )
    assert acts.states() == ["active", "completed"]
    active, completed = acts.statuses
    for update in acts.statuses:
        assert (update.job_id, update.queue, update.company_id, update.name) == (
            req.job_id,
            TRAINING_QUEUE,
            "acme",
            "train",
        )
    assert (active.stage, active.attempts_made, active.result) == ("exporting", 0, None)
    assert completed.result == asdict(result)
    assert (completed.progress, completed.attempts_made, completed.failed_reason) == (
        100.0,
        1,
        None,
    )
    assert completed.duration_s is not None and completed.duration_s >= 0


async def test_progress_query_follows_the_stages(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    held: dict[str, asyncio.Event] = {}

    def hold(name: str) -> None:
        held[name] = asyncio.Event()

        async def wait(_: Any) -> None:
            await held[name].wait()

        acts.behave[name] = wait

    for name in ("export_training_data", "train_model", "register_model"):
        hold(name)
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request())
        for name, expected in (
            ("export_training_data", JobProgress("exporting", 0.0)),
            ("train_model", JobProgress("training", 5.0)),
            ("register_model", JobProgress("registering", 95.0)),
        ):
            await until(lambda name=name: bool(acts.called(name)), name)
            assert await handle.query(TrainingWorkflow.progress) == expected, name
            held[name].set()
        await handle.result()
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("completed", 100.0)


@pytest.mark.parametrize(
    ("backoff_type", "waits"), [("exponential", [5.0, 10.0]), ("fixed", [5.0, 5.0])]
)
async def test_train_is_retried_with_the_jobs_attempts_and_backoff(
    env: WorkflowEnvironment, acts: StandIns, queue: str, backoff_type: str, waits: list[float]
) -> None:
    async def fails_twice(_: TrainModelRequest) -> None:
        if activity.info().attempt < 3:
            raise ApplicationError("no space left on device", type="DiskFullError")

    acts.behave["train_model"] = fails_twice
    options = JobOptions(attempts=3, backoff_type=backoff_type, backoff_delay_ms=5000)
    started = time.monotonic()
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request(options=options))
        result = await handle.result()

    tries = acts.called("train_model")
    assert [t.attempt for t in tries] == [1, 2, 3]
    gaps = [seconds(a, b) for a, b in zip(tries, tries[1:], strict=False)]
    for gap, wait in zip(gaps, waits, strict=True):
        assert wait <= gap < wait + 2, gaps  # the backoff, in the server's (skipped) time
    assert time.monotonic() - started < sum(waits)  # ... which did not pass in real time
    assert result.model_path.endswith(result.version)
    assert acts.called("register_model")[0].arg.adapter_path.endswith("attempt-3")
    assert acts.states() == ["active", "completed"]
    # attemptsMade counts runs of the job (POST .../retry), not tries of one step.
    assert acts.statuses[-1].attempts_made == 1
    duration = acts.statuses[-1].duration_s
    assert duration is not None and duration >= sum(waits)


async def test_train_failing_every_attempt_fails_the_job_with_its_message(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    acts.behave["train_model"] = retryable("no space left on device")
    options = JobOptions(attempts=2, backoff_delay_ms=1000, attempts_before=1)
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request(options=options))
        cause = await failure_of(handle)
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("failed", 5.0)

    reason = "training failed: no space left on device"
    assert isinstance(cause, ApplicationError)
    assert (cause.message, cause.non_retryable) == (reason, True)
    assert [t.attempt for t in acts.called("train_model")] == [1, 2]
    assert "register_model" not in acts.steps()
    assert acts.states() == ["active", "failed"]
    failed = acts.statuses[-1]
    assert (failed.failed_reason, failed.attempts_made, failed.stage) == (reason, 2, "failed")
    assert failed.result is None


@pytest.mark.parametrize("error_type", NON_RETRYABLE_ERRORS)
async def test_non_retryable_error_stops_training_at_once(
    env: WorkflowEnvironment, acts: StandIns, queue: str, error_type: str
) -> None:
    async def refuses(_: TrainModelRequest) -> None:
        # Not flagged non_retryable: the workflow's retry policy must know the type.
        raise ApplicationError(f"{error_type} says no", type=error_type)

    acts.behave["train_model"] = refuses
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request(options=JobOptions(attempts=5)))
        cause = await failure_of(handle)

    assert [t.attempt for t in acts.called("train_model")] == [1]
    assert isinstance(cause, ApplicationError)
    assert cause.message == f"training failed: {error_type} says no"
    assert acts.statuses[-1].failed_reason == cause.message


async def test_invalid_dataset_fails_the_job_before_training(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def too_small(_: ExportRequest) -> None:
        raise ApplicationError("acme has 3 usable examples; 10 needed", type="InvalidDatasetError")

    acts.behave["export_training_data"] = too_small
    async with workers(env, acts, queue):
        cause = await failure_of(await start_training(env, queue, train_request()))

    assert str(cause) == "exporting failed: acme has 3 usable examples; 10 needed"
    assert acts.steps() == ["queue_paused", "export_training_data"]
    assert acts.states() == ["active", "failed"]


async def test_train_that_stops_heartbeating_is_retried_after_the_heartbeat_timeout(
    own_env: WorkflowEnvironment, queue: str
) -> None:
    # Its own server: an activity that sleeps in server time past its own timeout unbalances
    # the test server's time-skipping lock (temporalio/sdk-java#2246).
    env, acts = own_env, StandIns(own_env)
    heartbeat_s = 20
    tries: list[tuple[int, datetime]] = []
    resumed_from: list[Any] = []

    async def hangs_once(_: TrainModelRequest) -> None:
        info = activity.info()
        tries.append((info.attempt, info.current_attempt_scheduled_time))
        if info.attempt > 1:
            resumed_from.extend(info.heartbeat_details)
            return
        activity.heartbeat({"step": 30, "checkpoint": "checkpoint-30"})
        await server_has_heartbeat(env, info.workflow_id)
        # The trainer hangs: the server's clock runs on (skipped), no heartbeat follows; this
        # try is left hanging until the worker shuts down.
        await env.sleep(heartbeat_s + 10)
        await asyncio.Event().wait()

    acts.behave["train_model"] = hangs_once
    req = train_request(
        heartbeat_timeout_s=heartbeat_s, options=JobOptions(attempts=2, backoff_delay_ms=1000)
    )
    started = time.monotonic()
    async with workers(env, acts, queue):
        result = await (await start_training(env, queue, req)).result()

    (first, first_at), (second, second_at) = tries
    assert (first, second) == (1, 2)
    # The retry was scheduled once the heartbeat timeout had passed (plus the 1 s backoff).
    assert heartbeat_s <= (second_at - first_at).total_seconds() <= heartbeat_s + 2
    assert time.monotonic() - started < heartbeat_s
    # The retry gets the last heartbeat, so training resumes from its checkpoint.
    assert resumed_from == [{"step": 30, "checkpoint": "checkpoint-30"}]
    assert result.model_path == f"/models/acme/{req.job_id}"  # version defaults to the job id
    assert acts.states() == ["active", "completed"]


async def test_cancel_during_training_fails_the_job_and_cancels_the_run(
    own_env: WorkflowEnvironment, queue: str
) -> None:
    env, acts = own_env, StandIns(own_env)
    cancelled: list[int] = []

    async def trains_until_cancelled(_: TrainModelRequest) -> None:
        try:
            while True:
                activity.heartbeat({"step": 1})
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            cancelled.append(activity.info().attempt)
            raise

    acts.behave["train_model"] = trains_until_cancelled
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request(heartbeat_timeout_s=3))
        await until(lambda: bool(acts.called("train_model")), "training to start")
        await handle.cancel()
        cause = await failure_of(handle)
        # The running step hears of it (by its heartbeat), so the training process is stopped.
        await until(lambda: cancelled == [1], "the training step to be cancelled")

    assert isinstance(cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert "register_model" not in acts.steps()
    assert acts.states() == ["active", "failed"]
    failed = acts.statuses[-1]
    assert (failed.failed_reason, failed.attempts_made) == ("cancelled during training", 1)


async def test_mirror_down_does_not_fail_the_job(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def redis_down(_: StatusUpdate) -> None:
        raise ApplicationError("connection refused")

    acts.behave["record_status"] = redis_down
    async with workers(env, acts, queue):
        result = await (await start_training(env, queue, train_request(version="2.0"))).result()

    assert result.version == "2.0"
    assert acts.steps() == ["queue_paused", "export_training_data", "train_model", "register_model"]


# --- pause gate -------------------------------------------------------------------------------


async def test_paused_queue_holds_the_job_until_release(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    acts.paused = True
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request())
        await until(lambda: acts.states() == ["paused"], "the paused state")
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("paused", 0.0)
        await env.sleep(45)  # one periodic recheck: still paused, so still held
        assert acts.steps() == ["queue_paused", "queue_paused"]
        assert await handle.query(TrainingWorkflow.progress) == JobProgress("paused", 0.0)
        released_at = await env.get_current_time()
        await handle.signal(TrainingWorkflow.release)
        await handle.result()

    assert acts.steps() == [
        "queue_paused",
        "queue_paused",
        "export_training_data",
        "train_model",
        "register_model",
    ]
    first, second = acts.called("queue_paused")
    assert 30 <= seconds(first, second) < 32
    assert acts.called("export_training_data")[0].at >= released_at
    assert acts.states() == ["paused", "active", "completed"]
    assert acts.statuses[0].stage == "paused"


async def test_paused_job_starts_when_a_recheck_finds_the_queue_resumed(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    acts.paused = True
    async with workers(env, acts, queue):
        handle = await start_training(env, queue, train_request())
        await until(lambda: acts.states() == ["paused"], "the paused state")
        acts.paused = False  # resumed, but no release signal reaches this job
        await handle.result()

    checks = acts.called("queue_paused")
    assert [c.arg for c in checks] == [TRAINING_QUEUE, TRAINING_QUEUE]
    assert 30 <= seconds(checks[0], checks[1]) < 32
    assert acts.steps()[2:] == ["export_training_data", "train_model", "register_model"]
    assert acts.states() == ["paused", "active", "completed"]


async def test_queue_state_unknown_runs_the_job(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def control_unreachable(_: str) -> None:
        raise ApplicationError("queue control workflow unreachable")

    acts.behave["queue_paused"] = control_unreachable
    async with workers(env, acts, queue):
        await (await start_training(env, queue, train_request())).result()

    assert acts.steps()[-3:] == ["export_training_data", "train_model", "register_model"]
    assert acts.states() == ["active", "completed"]


# --- deployment -------------------------------------------------------------------------------


async def test_deployment_converts_deploys_verifies_and_finishes(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    req = deploy_request(target="ollama", outtype="q8_0", source_job="train-acme-1")
    async with workers(env, acts, queue):
        handle = await env.client.start_workflow(
            DeploymentWorkflow.run, req, id=req.job_id, task_queue=queue
        )
        result = await handle.result()

    assert acts.steps() == [
        "queue_paused",
        "convert_to_gguf",
        "deploy_model",
        "verify_deployment",
        "finish_publish",
    ]
    assert acts.called("queue_paused")[0].arg == DEPLOYMENT_QUEUE
    convert = acts.called("convert_to_gguf")[0].arg
    assert (convert.model_path, convert.outtype) == ("/models/acme/1.0", "q8_0")
    publish = acts.called("deploy_model")[0].arg
    assert (publish.model_name, publish.target, publish.source_job) == (
        req.model_name,
        "ollama",
        "train-acme-1",
    )
    assert publish.gguf.gguf_path == "/models/acme/1.0/model-q8_0.gguf"
    published = acts.called("verify_deployment")[0].arg.published
    assert acts.called("finish_publish")[0].arg == published
    assert result == DeployResult(
        model_name=req.model_name,
        target="ollama",
        location=f"/models/registry/{req.model_name}",
        digest="sha256:" + "cd" * 32,
        gguf_path="/models/acme/1.0/model-q8_0.gguf",
        verification=VerifyResult("What do you sell?", "Anvils.", 3, 0.1, 30.0),
    )
    assert acts.states() == ["active", "completed"]
    active, completed = acts.statuses
    assert (active.queue, active.name, active.stage) == (DEPLOYMENT_QUEUE, "deploy", "converting")
    assert (completed.result, completed.attempts_made) == (asdict(result), 1)


async def test_failed_verification_rolls_back_the_published_model(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def replaced(req: PublishRequest) -> PublishResult:
        return PublishResult(req.model_name, req.target, "/registry/x", "sha256:1", True, True)

    async def answers_nothing(_: VerifyRequest) -> None:
        raise ApplicationError("the model answered nothing", type="VerificationFailedError")

    acts.behave["deploy_model"] = replaced
    acts.behave["verify_deployment"] = answers_nothing
    req = deploy_request()
    async with workers(env, acts, queue):
        handle = await env.client.start_workflow(
            DeploymentWorkflow.run, req, id=req.job_id, task_queue=queue
        )
        cause = await failure_of(handle)

    reason = (
        f"verifying failed: the model answered nothing; {req.model_name} was removed"
        " and the previous version restored"
    )
    assert str(cause) == reason
    assert acts.steps()[-3:] == ["deploy_model", "verify_deployment", "unpublish_model"]
    assert acts.called("unpublish_model")[0].arg == PublishResult(
        req.model_name, "local", "/registry/x", "sha256:1", True, True
    )
    assert "finish_publish" not in acts.steps()
    assert acts.states() == ["active", "failed"]
    assert acts.statuses[-1].failed_reason == reason


async def test_failed_rollback_is_named_in_the_reason(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def answers_nothing(_: VerifyRequest) -> None:
        raise ApplicationError("the model answered nothing", type="VerificationFailedError")

    acts.behave["verify_deployment"] = answers_nothing
    acts.behave["unpublish_model"] = retryable("registry is read-only")
    req = deploy_request()
    async with workers(env, acts, queue):
        handle = await env.client.start_workflow(
            DeploymentWorkflow.run, req, id=req.job_id, task_queue=queue
        )
        cause = await failure_of(handle)

    assert str(cause) == (
        "verifying failed: the model answered nothing; "
        f"removing {req.model_name} failed: registry is read-only"
    )
    assert len(acts.called("unpublish_model")) == 5  # the rollback tried hard first


async def test_cancel_while_publishing_leaves_no_unverified_model(
    own_env: WorkflowEnvironment, queue: str
) -> None:
    env, acts = own_env, StandIns(own_env)
    landed: list[str] = []

    async def publish_lands_anyway(req: PublishRequest) -> None:
        # As the local target's publish does: the copy and rename run in a thread, which a
        # cancel does not stop, so the model lands under its name while the step is cancelled.
        try:
            while True:
                activity.heartbeat()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            landed.append(req.model_name)
            raise

    acts.behave["deploy_model"] = publish_lands_anyway
    req = deploy_request(heartbeat_timeout_s=3)
    async with workers(env, acts, queue):
        handle = await env.client.start_workflow(
            DeploymentWorkflow.run, req, id=req.job_id, task_queue=queue
        )
        await until(lambda: bool(acts.called("deploy_model")), "publishing to start")
        await handle.cancel()
        cause = await failure_of(handle)
        # The job is reported only once the publish has landed (WAIT_CANCELLATION_COMPLETED).
        assert landed == [req.model_name]

    assert isinstance(cause, CancelledError)
    assert acts.statuses[-1].state == "failed"
    assert (acts.statuses[-1].failed_reason or "").startswith("cancelled during deploying")
    # The workflow waited for the publish to land, then withdrew this job's publication.
    withdrawn = [call.arg.model_name for call in acts.called("withdraw_publication")]
    assert withdrawn == [req.model_name]
    assert (acts.statuses[-1].failed_reason or "").endswith(f"{req.model_name} was removed")


async def test_failure_before_publishing_removes_nothing(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def corrupt(_: ConvertRequest) -> None:
        raise ApplicationError("not a safetensors model", type="InvalidModelError")

    acts.behave["convert_to_gguf"] = corrupt
    req = deploy_request()
    async with workers(env, acts, queue):
        handle = await env.client.start_workflow(
            DeploymentWorkflow.run, req, id=req.job_id, task_queue=queue
        )
        cause = await failure_of(handle)

    assert str(cause) == "converting failed: not a safetensors model"
    assert acts.steps() == ["queue_paused", "convert_to_gguf"]


# --- auto-deploy: a child DeploymentWorkflow on the deployment queue --------------------------


async def test_auto_deploy_waits_while_the_tenant_is_at_its_running_limit(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    """The child deployment is one more running job: it starts only when the tenant's
    running-jobs quota has room, asking again with backoff (in skipped time)."""

    async def at_limit_twice(company_id: str) -> None:
        if len(acts.called("admit_child_job")) <= 2:
            raise ApplicationError(f"company '{company_id}' has 3 other jobs running")

    acts.behave["admit_child_job"] = at_limit_twice
    req = train_request(version="4", auto_deploy=True, deploy_target="local")
    async with workers(env, acts, queue, DEPLOYMENT_QUEUE):
        result = await (await start_training(env, queue, req)).result()

    asked = acts.called("admit_child_job")
    assert [c.attempt for c in asked] == [1, 2, 3]
    assert (asked[1].at - asked[0].at).total_seconds() >= 5
    assert (asked[2].at - asked[1].at).total_seconds() >= 10
    first_deploy_step = acts.called("convert_to_gguf")[0]
    assert first_deploy_step.at >= asked[2].at, "the child started before it was admitted"
    assert result.deployment is not None and result.deployment["state"] == "completed"


async def test_auto_deploy_runs_the_deployment_after_training(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    req = train_request(version="3", auto_deploy=True, deploy_version="3.1", deploy_target="local")
    async with workers(env, acts, queue, DEPLOYMENT_QUEUE):
        result = await (await start_training(env, queue, req)).result()

    assert acts.steps() == [
        "queue_paused",
        "export_training_data",
        "train_model",
        "register_model",
        "admit_child_job",
        "queue_paused",
        "convert_to_gguf",
        "deploy_model",
        "verify_deployment",
        "finish_publish",
    ]
    assert acts.called("admit_child_job")[0].arg == "acme"
    assert acts.called("queue_paused")[1].arg == DEPLOYMENT_QUEUE
    assert acts.called("convert_to_gguf")[0].arg.model_path == "/models/acme/3"
    deployment = result.deployment
    assert deployment is not None
    name = f"{BASE}-company-acme:3.1"
    assert deployment["modelName"] == name
    assert deployment["state"] == "completed"
    assert deployment["result"]["model_name"] == name
    assert deployment["jobId"].startswith("deploy-acme-")
    # The child reports its own job; the training job completes after it, with its outcome.
    assert [(s.name, s.state) for s in acts.statuses] == [
        ("train", "active"),
        ("deploy", "active"),
        ("deploy", "completed"),
        ("train", "completed"),
    ]
    assert acts.statuses[1].job_id == deployment["jobId"]
    assert acts.statuses[-1].result == asdict(result)


async def test_failed_auto_deploy_is_reported_and_the_training_job_still_completes(
    env: WorkflowEnvironment, acts: StandIns, queue: str
) -> None:
    async def answers_nothing(_: VerifyRequest) -> None:
        raise ApplicationError("the model answered nothing", type="VerificationFailedError")

    acts.behave["verify_deployment"] = answers_nothing
    req = train_request(version="4", auto_deploy=True)
    async with workers(env, acts, queue, DEPLOYMENT_QUEUE):
        result = await (await start_training(env, queue, req)).result()

    name = f"{BASE}-company-acme:4"
    assert result.deployment is not None
    assert result.deployment["state"] == "failed"
    assert result.deployment["failedReason"] == (
        f"verifying failed: the model answered nothing; {name} was removed"
    )
    assert acts.called("unpublish_model")
    assert [(s.name, s.state) for s in acts.statuses][-2:] == [
        ("deploy", "failed"),
        ("train", "completed"),
    ]
