"""Subprocesses for heavy work (torch, llama.cpp), so the worker's event loop stays responsive."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from tenanttune.errors import DiskFullError, ResourceLimitError
from training.exits import EXIT_NO_MEMORY, EXIT_NO_SPACE

REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


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

    Each JSON line goes to `on_event`; other lines are logged. Cancelling the activity
    terminates the subprocess's process group.
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
        beats = asyncio.create_task(self._heartbeat_forever())
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
                        await self.on_event(event)
            self.returncode = await proc.wait()
            await drain
        except BaseException:
            # Cancelled, or anything else went wrong here: never leave the child running.
            await terminate(proc)
            raise
        finally:
            beats.cancel()
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

    async def _heartbeat_forever(self) -> None:
        # Loading a model prints nothing for a while; keep the activity alive meanwhile.
        while True:
            activity.heartbeat(dict(self.details))
            await asyncio.sleep(5)

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.stderr.append(raw.decode(errors="replace").rstrip())


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the subprocess's group, then SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 5.0)
            return
        except TimeoutError:
            continue


@contextlib.asynccontextmanager
async def heartbeating(every_s: float = 5.0) -> AsyncIterator[None]:
    """Heartbeat while a long in-process step (hashing, reading a GGUF) runs."""

    async def beat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(every_s)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
