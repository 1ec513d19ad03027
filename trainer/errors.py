"""Errors the trainer reports to people, and the process exit codes they map to.

The exit codes are the contract's (:class:`tinv.api.models.ExitCode`, which documents each one);
they are repeated here by name only, for the trainer's modules.
"""

from __future__ import annotations

from tinv.api.models import ExitCode

EXIT_OK = ExitCode.OK
EXIT_INTERNAL = ExitCode.INTERNAL
EXIT_INVALID = ExitCode.INVALID
EXIT_UNAVAILABLE = ExitCode.UNAVAILABLE
EXIT_PREEMPTED = ExitCode.PREEMPTED
EXIT_INTERRUPTED = ExitCode.INTERRUPTED

#: Exit codes after which a retry may succeed (the operator's podFailurePolicy input).
RETRYABLE_EXIT_CODES = ExitCode.RETRYABLE


class TinvError(Exception):
    """An error with a message meant for a person, and the exit code it maps to."""

    exit_code = EXIT_INTERNAL
    reason = "InternalError"


class ConfigError(TinvError):
    """The job document is invalid for training (beyond what the schema checks)."""

    exit_code = EXIT_INVALID
    reason = "InvalidSpec"


class DataError(TinvError):
    """Training images are missing or unusable."""

    exit_code = EXIT_INVALID
    reason = "InvalidData"


class ModelError(TinvError):
    """A model source is malformed or does not hold a usable Stable Diffusion model."""

    exit_code = EXIT_INVALID
    reason = "InvalidModel"


class UnavailableError(TinvError):
    """A remote dependency (hub, object store) could not be reached."""

    exit_code = EXIT_UNAVAILABLE
    reason = "Unavailable"


class FormatError(TinvError):
    """An embedding file is not in any format tinv reads."""

    exit_code = EXIT_INVALID
    reason = "InvalidEmbedding"
