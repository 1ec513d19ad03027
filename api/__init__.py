"""tinv.api: the contract shared by the operator, the trainer and the CLI.

Models (`tinv.api.models`), CRD generation (`tinv.api.crdgen`), offline validation
(`tinv.api.validation`) and the storage layout (`tinv.api.storage`). Imports neither
torch nor kopf.
"""

from .models import (
    API_VERSION,
    GROUP,
    VERSION,
    ConditionType,
    GenerationGrid,
    Reason,
    TextualInversionJob,
)
from .validation import InvalidResource, Problem, load_resource, validate_document

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ConditionType",
    "GenerationGrid",
    "InvalidResource",
    "Problem",
    "Reason",
    "TextualInversionJob",
    "load_resource",
    "validate_document",
]
