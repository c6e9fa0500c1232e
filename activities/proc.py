"""Subprocesses for heavy work (torch, llama.cpp), so the worker's event loop stays responsive."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tenanttune.errors import DiskFullError, ResourceLimitError
from training.exits import EXIT_NO_MEMORY, EXIT_NO_SPACE

REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1

EventHandler = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)

# Heartbeats. The SDK sends a recorded heartbeat to the server at most once per throttle
# interval, min(0.8 x heartbeat timeout, the worker's max throttle), so with the defaults a
# heartbeat recorded a moment late (a busy event loop) could reach the server after the timeout.
# Recording every tenth of the timeout, and a worker throttle of a tenth of its smallest
# configured timeout (worker.py), puts a heartbeat on the server about every fifth of the
# timeout: the worker's event loop may stall for most of a timeout before a live attempt is
# taken for dead.
BEATS_PER_TIMEOUT = 10
MAX_BEAT_INTERVAL_S = 5.0  # fresh details for readers (the status read path shows them)
MIN_BEAT_INTERVAL_S = 0.1
MIN_THROTTLE_S = 1.0


def beat_interval(heartbeat_timeout: timedelta | None) -> float:
    """Seconds between two heartbeats an activity records, from its heartbeat timeout."""
    if not heartbeat_timeout:
        return MAX_BEAT_INTERVAL_S
    share = heartbeat_timeout.total_seconds() / BEATS_PER_TIMEOUT
    return min(max(share, MIN_BEAT_INTERVAL_S), MAX_BEAT_INTERVAL_S)


def heartbeat_throttle(heartbeat_timeouts_s: Iterable[float]) -> timedelta:
    """The worker's heartbeat throttle (`max_heartbeat_throttle_interval`): how long the SDK may
    hold a recorded heartbeat back, a tenth of the smallest heartbeat timeout its activities get."""
    smallest = min(heartbeat_timeouts_s)
    return timedelta(seconds=max(smallest / BEATS_PER_TIMEOUT, MIN_THROTTLE_S))


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the worker dies, so no orphan keeps running."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_setup(memory_mb: int) -> Callable[[], None]:
    """What the child runs before exec: die with the worker, and cap its address space."""

    def setup() -> None:
        die_with_parent()
        if memory_mb > 0:
            limit = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return setup


class ScriptRun:
    """Run `python -m <module> ...` that prints JSON lines; heartbeat while it runs.

    Each JSON line goes to `on_event` (called in the reading loop: it must not wait for
    anything); other lines are logged. The heartbeat does not depend on the child's output: it
    sends `details` on a clock (`heartbeating`), the caller's if one is already running.
    Cancelling the activity terminates the subprocess's process group.
    """

    def __init__(
        self, on_event: EventHandler | None = None, *, memory_mb: int = 0, wall_clock_s: float = 0
    ) -> None:
        self.on_event = on_event
        self.memory_mb = memory_mb  # RLIMIT_AS of the child; 0: none
        self.wall_clock_s = wall_clock_s  # the child is stopped after this long; 0: never
        self.timed_out = False
        self.details: dict[str, Any] = {}
        self.stderr: deque[str] = deque(maxlen=40)
        self.last_event: dict[str, Any] = {}
        self.returncode: int | None = None

    async def run(self, module: str, *args: str) -> int:
        beats = contextlib.nullcontext() if heartbeat_running() else heartbeating(self.details)
        async with beats:
            return await self._run(module, *args)

    async def _run(self, module: str, *args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,  # a long line must not break the reader
            start_new_session=True,
            preexec_fn=_child_setup(self.memory_mb),
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        assert proc.stdout is not None and proc.stderr is not None
        drain = asyncio.create_task(self._drain(proc.stderr))
        watchdog = asyncio.create_task(self._stop_after(proc)) if self.wall_clock_s else None
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                try:
                    event = json.loads(line)
                except ValueError:
                    activity.logger.info("%s: %s", module, line)
                    continue
                if isinstance(event, dict):
                    self.last_event = event
                    if self.on_event is not None:
                        self.on_event(event)
            self.returncode = await proc.wait()
            await drain
        except BaseException:
            # Cancelled, or anything else went wrong here: never leave the child running.
            await terminate(proc)
            raise
        finally:
            drain.cancel()
            if watchdog is not None:
                watchdog.cancel()
        return self.returncode

    async def _stop_after(self, proc: asyncio.subprocess.Process) -> None:
        await asyncio.sleep(self.wall_clock_s)
        self.timed_out = True
        await terminate(proc)

    def stderr_tail(self, chars: int = 3000) -> str:
        return "\n".join(self.stderr)[-chars:]

    def error(self, what: str) -> ApplicationError:
        """The failure to raise: a full disk is said so plainly (retryable, space may be freed)."""
        if self.timed_out:
            return ApplicationError(
                f"{what} ran past its wall-clock limit of {self.wall_clock_s:.0f} s and was "
                "stopped (TRAIN_MAX_WALL_CLOCK_S)",
                type=ResourceLimitError.__name__,
                non_retryable=True,
            )
        if self.returncode == EXIT_NO_MEMORY:
            message = self.last_event.get("message", "out of memory")
            return ApplicationError(
                f"{what} exceeded its memory limit of {self.memory_mb} MB "
                f"(TRAIN_MAX_MEMORY_MB): {message}",
                type=ResourceLimitError.__name__,
                non_retryable=True,
            )
        if self.returncode == EXIT_NO_SPACE:
            message = self.last_event.get("message", "no space left on device")
            return ApplicationError(f"{what}: {message}", type=DiskFullError.__name__)
        return ApplicationError(self.failure(what))

    def failure(self, what: str) -> str:
        """A short reason for the job (the last stderr line); the whole tail goes to the log."""
        activity.logger.warning(
            "%s failed (status %s):\n%s", what, self.returncode, self.stderr_tail()
        )
        last = next((line.strip() for line in reversed(self.stderr) if line.strip()), "")
        return f"{what} exited with status {self.returncode}: {last[:300]} (see the worker log)"

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.stderr.append(raw.decode(errors="replace").rstrip())


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the subprocess's group, then SIGKILL after a grace period; returns only once the
    subprocess has ended, so the slot it held is never given to another while it still runs
    (on a loaded machine a killed training took longer than any fixed wait to be reaped)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
        return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await asyncio.shield(proc.wait())


_beating: contextvars.ContextVar[bool] = contextvars.ContextVar("heartbeating", default=False)


def heartbeat_running() -> bool:
    """Whether this activity already heartbeats on a clock (`heartbeating`)."""
    return _beating.get()


@contextlib.asynccontextmanager
async def heartbeating(details: dict[str, Any] | None = None) -> AsyncIterator[None]:
    """Heartbeat on a clock for as long as the block runs, whatever it does meanwhile.

    Every `beat_interval` of the activity's heartbeat timeout, a copy of `details` (the
    caller keeps updating that dict) is recorded; the first right away. Nothing else runs on
    this path, so a slow step, a silent subprocess or a slow Redis cannot delay it; only a
    blocked event loop can, and a stall longer than half the timeout is logged.
    """
    timeout = activity.info().heartbeat_timeout
    every_s = beat_interval(timeout)

    async def beat() -> None:
        while True:
            activity.heartbeat(*(() if details is None else (dict(details),)))
            started = time.monotonic()
            await asyncio.sleep(every_s)
            late = time.monotonic() - started - every_s
            if timeout and late > timeout.total_seconds() / 2:
                activity.logger.warning(
                    "heartbeat %.1f s late: this worker's event loop was blocked (heartbeat "
                    "timeout %.0f s)",
                    late,
                    timeout.total_seconds(),
                )

    task = asyncio.create_task(beat())
    token = _beating.set(True)
    try:
        yield
    finally:
        _beating.reset(token)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class WriteBehind:
    """Mirror writes of a long activity (progress, events), done in order by one background
    task, so neither the heartbeat nor the reading of a child's output waits for Redis.

    They are cosmetic: when Redis is slower than the work, the oldest waiting writes are
    dropped (at most `limit` wait), and whatever is still waiting when the work ends gets
    `flush_s` to go out.
    """

    def __init__(self, limit: int = 64) -> None:
        self._writes: deque[Callable[[], Awaitable[None]]] = deque(maxlen=limit)
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0

    def add(self, write: Callable[[], Awaitable[None]]) -> None:
        if len(self._writes) == self._writes.maxlen:
            self.dropped += 1
        self._writes.append(write)
        self._idle.clear()
        self._ready.set()

    @contextlib.asynccontextmanager
    async def running(self, flush_s: float = 2.0) -> AsyncIterator[WriteBehind]:
        task = asyncio.create_task(self._work())
        try:
            yield self
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), flush_s)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.dropped:
                log.info("%d mirror writes dropped (Redis slower than the work)", self.dropped)

    async def _work(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._writes:
                write = self._writes.popleft()
                try:
                    await write()
                except Exception as exc:  # noqa: BLE001 - cosmetic; never stop the work
                    log.debug("mirror write failed: %s", exc)
            self._idle.set()
