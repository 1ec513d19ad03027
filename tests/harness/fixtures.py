"""pytest fixtures of the test harness (enabled by ``pytest_plugins = ["harness.fixtures"]``).

Session fixtures (started on first use, torn down at the end of the session):

* ``control_plane`` — a started :class:`harness.ControlPlane`: ``.kubeconfig``, ``.kubectl(...)``,
  ``.api_client()``, ``.new_namespace(prefix)``, ``.apply_crds()``, ``.nodes``, ``.finish_pod(...)``,
  ``.token_kubeconfig(ns, sa)``, ``.helm(...)``. ``USE_EXISTING_CLUSTER=true`` + ``KUBECONFIG`` uses
  that cluster instead of starting one.
* ``tinv_crds`` — applies deploy/crds/*.yaml (skips when the TextualInversionJob CRD is not there yet
  or did not apply).
* ``s3_server`` — a started :class:`harness.ObjectStore`: ``.endpoint_url``, ``.access_key``,
  ``.secret_key``, ``.make_bucket(name)``, ``.client()``, ``.env()``.
* ``kueue`` (opt-in: started by the first test that asks for it) — a started :class:`harness.Kueue`
  controller manager (its CRDs, RBAC and webhooks installed) on the ``workload_cluster``:
  ``.workloads(ns)``, ``.workload_of(ns, job_name)``, ``.logs()``; ``harness.kueue`` has
  ``resource_flavor``/``cluster_queue``/``local_queue`` manifest builders. Its webhooks are removed at
  the end of the session, before the manager stops.

Function fixtures: ``namespace`` (a fresh namespace, deleted afterwards) and ``workload_cluster``
(``control_plane``, skipping the test when controller-manager, scheduler or KWOK could not be run,
e.g. with bare envtest binaries).
"""

from __future__ import annotations

import pytest

from .binaries import BinariesError
from .controlplane import ControlPlane, ControlPlaneError, CrdApplyError
from .kueue import Kueue, KueueError
from .objectstore import ObjectStore, ObjectStoreError

TIJOB_CRD = "textualinversionjobs.tinv.io"


def _report(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest):
    cp = ControlPlane()
    try:
        cp.start()
    except (BinariesError, ControlPlaneError) as e:
        pytest.fail(f"test control plane unavailable: {e}", pytrace=False)
    bins = cp.binaries
    if cp.existing:
        _report(request.config, f"\n[harness] using the existing cluster at {cp.server} (USE_EXISTING_CLUSTER)")
    else:
        version = (bins.versions.get("kube") if bins else None) or "?"
        missing = f"; NOT running: {', '.join(cp.missing_components)}" if cp.missing_components else ""
        _report(request.config, f"\n[harness] control plane (Kubernetes {version}) up in {cp.startup_seconds:.1f} s at "
                                f"{cp.server}, workdir {cp.workdir}{missing}")
    yield cp
    cp.stop()


@pytest.fixture
def workload_cluster(control_plane: ControlPlane) -> ControlPlane:
    if control_plane.missing_components:
        pytest.skip(f"needs {', '.join(control_plane.missing_components)} (not found: run `make cluster-bins`)")
    if not control_plane.nodes:
        pytest.skip("needs the harness's fake GPU nodes (KWOK nodes labelled type=kwok)")
    return control_plane


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest):
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-") or "test"
    ns = control_plane.new_namespace(prefix)
    yield ns
    control_plane.delete_namespace(ns)


@pytest.fixture(scope="session")
def tinv_crds(control_plane: ControlPlane) -> list[str]:
    """The CRD names applied from deploy/crds. A file the apiserver refuses does not stop the tests of
    the CRDs that did apply (tests that need all of them call ``control_plane.apply_crds()`` again)."""
    error: CrdApplyError | None = None
    try:
        names = control_plane.apply_crds()
    except CrdApplyError as e:
        names, error = e.applied, e
    if TIJOB_CRD not in names:
        # Never a skip: a CRD the apiserver refuses (a CEL rule over the cost budget, say) is a bug.
        pytest.fail(f"the apiserver refused {TIJOB_CRD} from deploy/crds: {error or 'file missing (run `make crds`)'}", pytrace=False)
    return names


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest):
    store = ObjectStore()
    try:
        store.start()
    except (BinariesError, ObjectStoreError) as e:
        pytest.fail(f"test object store unavailable: {e}", pytrace=False)
    _report(request.config, f"\n[harness] S3 object store ({store.server}) up in {store.startup_seconds:.1f} s at "
                            f"{store.endpoint_url}")
    yield store
    store.stop()


@pytest.fixture(scope="session")
def kueue(request: pytest.FixtureRequest, control_plane: ControlPlane):
    if control_plane.existing:
        pytest.skip("the kueue fixture starts its own Kueue; not with USE_EXISTING_CLUSTER")
    if control_plane.missing_components or not control_plane.nodes:
        pytest.skip("Kueue needs the full harness (controller-manager, scheduler, KWOK nodes)")
    manager = Kueue(control_plane)
    try:
        manager.start()
    except (BinariesError, KueueError) as e:
        pytest.fail(f"Kueue unavailable: {e}", pytrace=False)
    _report(request.config, f"\n[harness] Kueue {manager.version} up in {manager.timings.get('total', 0):.1f} s "
                            f"(webhook 127.0.0.1:{manager.webhook_port}, log {manager.log})")
    yield manager
    manager.stop()
