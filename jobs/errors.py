"""Why the front door refuses a request. Each message says what to fix; the entry points map the
class to their own answer (HTTP status, exit code, a Bull job's failure)."""

from __future__ import annotations


class JobError(Exception):
    """A request about jobs that the front door refuses."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class JobNotFound(JobError):
    """No such job (or one of another tenant: the same answer, so nothing leaks)."""


class JobStateError(JobError):
    """The job is not in a state that allows this (e.g. retrying a running job)."""


class InvalidJob(JobError):
    """The job's input or the tenant's data cannot make a job; nothing was queued."""


class InvalidReference(JobError):
    """A malformed or forbidden id or path in the request (modelPath, version)."""


class QuotaExceeded(JobError):
    """The tenant has as many unfinished jobs as its plan allows."""


class SubmissionBusy(JobError):
    """Too many simultaneous submissions of one tenant; retry in a moment."""


class JobQueueUnavailable(JobError):
    """Temporal (the job queue) cannot be reached; nothing was queued."""
