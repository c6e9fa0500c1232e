"""Exit statuses shared by the scripts and the activities that run them."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

EXIT_BAD_INPUT = 3  # input that no retry will fix
EXIT_NO_SPACE = 4  # the disk filled up; a retry can succeed once space is freed
EXIT_NO_MEMORY = 5  # over the process's memory limit; the same job would fail again

_OUT_OF_MEMORY = (
    "can't allocate memory",
    "Cannot allocate memory",
    "failed to map segment",
    "CUDA out of memory",
    "CUDA error: out of memory",
)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library wraps it (safetensors' writer raises its own error
    whose text carries the OS error: "No space left on device (os error 28)")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_message(exc: BaseException, near: Path) -> str:
    """Where the disk filled and how much is left, so an operator knows what to free."""
    filename = getattr(exc, "filename", None)
    where = Path(filename) if filename else near
    probe = where if where.exists() else where.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return f"no space left on device writing {where} ({free}); free space there, then retry the job"


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of address space under RLIMIT_AS: Python's MemoryError, torch's allocator error,
    or a shared library that could not be mapped while importing."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MemoryError) or any(t in str(seen) for t in _OUT_OF_MEMORY):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
