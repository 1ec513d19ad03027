"""Errors the trainer reports to people, and the process exit codes they map to.

Exit codes (the operator's retry policy reads them; keep in sync with its Job builder):

====  ======================  =========================================================
code  name                    meaning, and whether the operator should retry
====  ======================  =========================================================
0     EXIT_OK                 training finished (or was already finished); not retried
1     EXIT_INTERNAL           an unexpected error (a bug, CUDA fault, OOM); retryable
2     EXIT_INVALID            bad config or input (spec, images, tokens, resume source);
                              not retryable: the same input fails the same way
69    EXIT_UNAVAILABLE        a dependency could not be reached (Hugging Face hub, object
                              storage); retryable with back-off
75    EXIT_PREEMPTED          SIGTERM received: a checkpoint was written, then the process
                              exited; retryable, and the retry resumes from that checkpoint
130   EXIT_INTERRUPTED        SIGINT (Ctrl-C) on a terminal: checkpoint written, stopped
====  ======================  =========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 69
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

#: Exit codes after which a retry may succeed (the operator's podFailurePolicy input).
RETRYABLE_EXIT_CODES = (EXIT_INTERNAL, EXIT_UNAVAILABLE, EXIT_PREEMPTED)


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
