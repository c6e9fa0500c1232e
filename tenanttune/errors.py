"""Domain errors. Their class names are non-retryable in the activities' retry policies."""

from __future__ import annotations


class TenantTuneError(Exception):
    """Base class for errors a user can act on."""


class InvalidDatasetError(TenantTuneError):
    """The tenant's data cannot be used for training (empty, malformed, too few examples)."""


class InvalidHyperparametersError(TenantTuneError):
    """The requested training configuration cannot run."""


class BaseModelError(TenantTuneError):
    """The base model is missing, not allowed, or not stored as safetensors."""


class TrainingFailedError(TenantTuneError):
    """The training script failed in a way a retry will not fix."""


class InvalidModelError(TenantTuneError):
    """The model to deploy is missing, corrupt, or not in a loadable safe format."""


class VerificationFailedError(TenantTuneError):
    """The deployed model did not answer the verification prompt."""


class DiskFullError(TenantTuneError):
    """A disk filled up while writing checkpoints, weights or a GGUF (retryable: space can be
    freed; the job's attempts bound it)."""


class ResourceLimitError(TenantTuneError):
    """A job went over one of its caps (memory, wall clock, token budget)."""


NON_RETRYABLE_ERRORS = [
    ResourceLimitError.__name__,
    InvalidModelError.__name__,
    VerificationFailedError.__name__,
    InvalidDatasetError.__name__,
    InvalidHyperparametersError.__name__,
    BaseModelError.__name__,
    TrainingFailedError.__name__,
]
