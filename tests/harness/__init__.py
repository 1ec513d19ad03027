"""Test harness: a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, KWOK fake GPU nodes), a real S3-compatible object store (versitygw) and, opt-in, a real
Kueue controller manager on loopback,
from binaries that hack/cluster-bins.sh builds once from the Go module proxy.

pytest: ``pytest_plugins = ["harness.fixtures"]`` gives the session fixtures ``control_plane``,
``s3_server`` and friends (see fixtures.py). Outside pytest: ``ControlPlane()`` / ``ObjectStore()``
are context managers.
"""

from .binaries import Binaries, BinariesError, find_binaries
from .controlplane import (
    DEFAULT_NODES,
    EXIT_CODE_ANNOTATION,
    GPU_CLASS_LABEL,
    GPU_RESOURCE,
    MESSAGE_ANNOTATION,
    REGION_LABEL,
    RUN_FOR_ANNOTATION,
    ControlPlane,
    ControlPlaneError,
    CrdApplyError,
    FakeNode,
    KubectlError,
    pod_annotations,
)
from .kueue import Kueue, KueueError
from .objectstore import ObjectStore, ObjectStoreError

__all__ = [
    "Binaries", "BinariesError", "find_binaries",
    "DEFAULT_NODES", "EXIT_CODE_ANNOTATION", "GPU_CLASS_LABEL", "GPU_RESOURCE", "MESSAGE_ANNOTATION",
    "REGION_LABEL", "RUN_FOR_ANNOTATION", "ControlPlane", "ControlPlaneError", "CrdApplyError", "FakeNode", "KubectlError",
    "pod_annotations", "ObjectStore", "ObjectStoreError", "Kueue", "KueueError",
]
