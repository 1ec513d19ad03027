"""What the operator keeps per resource: packed and compact copies, no status kept twice, freed heap given back.

bench/README.md (2026-12-03) measured about 64 KiB of operator memory per resource; these are the
parts of it the operator controls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinv.api.models import Annotation
from tinv.operator import polling
from tinv.operator.registry import Registry, compact, slim

ROOT = Path(__file__).resolve().parents[2]
KEY = ("TextualInversionJob", "ns", "a")


def _decoded(name: str, rv: str = "5") -> dict:
    """A resource as the watch delivers it: freshly decoded JSON, managedFields and kopf's annotations."""
    body = {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {
            "name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1, "resourceVersion": rv,
            "annotations": {Annotation.DIFF_BASE: json.dumps({"spec": {"model": "builtin:tiny"}}), "team": "vision"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"model": "builtin:tiny", "concepts": [{"token": "det-logo", "initializer": "logo"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": "Running"}]},
    }
    return json.loads(json.dumps(body))  # json.loads shares strings only within one document


def test_the_index_keeps_one_packed_block_per_resource_without_kopfs_spec_string_and_managed_fields():
    body = _decoded("a")
    packed = slim(body)
    assert isinstance(packed, bytes)  # one object (a real resource, 2-3 KB, is a block in the C heap)
    assert len(packed) < len(json.dumps(body))
    reg = Registry()
    reg.indices = {"tinv_tijobs": {("ns", "a"): [packed]}}
    kept = reg.resource(KEY)
    assert kept["spec"] == body["spec"] and kept["status"] == body["status"]
    assert kept["metadata"]["annotations"] == {"team": "vision"}
    assert "managedFields" not in kept["metadata"]
    kept["spec"]["concepts"][0]["token"] = "changed"  # every read is a fresh copy
    assert reg.resource(KEY)["spec"]["concepts"][0]["token"] == "det-logo"


def test_two_views_share_their_keys_and_short_values():
    a, b = compact(_decoded("a")), compact(_decoded("b"))
    ka = next(k for k in a["status"]["conditions"][0] if k == "reason")
    kb = next(k for k in b["status"]["conditions"][0] if k == "reason")
    assert ka is kb
    assert a["status"]["phase"] is b["status"]["phase"]
    assert a["spec"]["model"] is b["spec"]["model"]
    # separately decoded documents do not share them: without compact() each view pays again
    d1, d2 = _decoded("a"), _decoded("b")
    assert d1["status"]["phase"] is not d2["status"]["phase"]
    long_value = "x" * 200
    assert compact({"m": long_value})["m"] == long_value


def test_a_written_status_is_dropped_once_the_watch_shows_it():
    reg = Registry()
    reg.written[KEY] = (7, {"phase": "Succeeded"})
    assert reg.status_of(KEY, _decoded("a", rv="6")) == {"phase": "Succeeded"}  # the watch is behind
    assert KEY in reg.written
    shown = _decoded("a", rv="7")
    assert reg.status_of(KEY, shown) == shown["status"]
    assert KEY not in reg.written  # one copy of the status per resource, not two


@pytest.mark.skipif(polling._TRIM is None or not Path("/proc/self/statm").exists(), reason="glibc on Linux only")
def test_trim_heap_gives_freed_heap_pages_back():
    # In a fresh interpreter: ~200 MiB of objects above pymalloc's 512-byte limit (so in the C heap),
    # one more allocated after them so the heap's top stays in use and free() alone cannot shrink it.
    script = textwrap.dedent("""
        import json, os
        from tinv.operator.polling import trim_heap
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
        blocks = [bytes(2048) for _ in range(100_000)]
        pin = bytes(2048)
        full = rss()
        del blocks
        freed = rss()
        trim_heap()
        print(json.dumps({"full": full, "freed": freed, "trimmed": rss()}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    mib = json.loads(out.stdout)
    assert mib["freed"] > mib["full"] - 50, mib  # freed, but still resident
    assert mib["trimmed"] < mib["freed"] - 150, mib  # given back
