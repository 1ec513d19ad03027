"""Small helpers several test layers share (tests/ is on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def merge(a: dict, b: dict) -> dict:
    """A deep copy of `a` with `b` merged in, recursively for nested mappings."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_resource(path: Path, resource: Any) -> Path:
    """Write a tinv.api resource as the YAML a user would apply; return the path."""
    import yaml

    path.write_text(yaml.safe_dump(resource.to_doc(), sort_keys=False))
    return path
