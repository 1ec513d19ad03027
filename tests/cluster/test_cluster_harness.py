"""The harness itself: real binaries of the pinned versions, quick start-up, a kubeconfig that
kubectl, the Python client and helm all use, and real authentication and RBAC."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from harness import KubectlError

pytestmark = pytest.mark.cluster


def test_real_binaries_and_versions(control_plane):
    cp = control_plane
    if cp.existing:
        pytest.skip("an existing cluster brings its own binaries")
    version = json.loads(cp.kubectl("version", "-o", "json").stdout)
    server = version["serverVersion"]
    assert int(server["major"]) == 1 and int(server["minor"].rstrip("+")) >= 33, server
    expected = cp.binaries.versions.get("kube")
    if expected and not os.environ.get("KUBEBUILDER_ASSETS"):
        assert server["gitVersion"] == expected
        assert version["clientVersion"]["gitVersion"] == expected, "the cache's kubectl is preferred over PATH's"
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        if name not in cp.missing_components:
            assert cp._procs[name].alive(), f"{name} is not running:\n{cp.logs(name)}"


def test_warm_start_up_is_quick(control_plane):
    cp = control_plane
    if cp.existing:
        pytest.skip("nothing was started")
    # < 30 s from a warm cache (typically 8-10 s); TINV_MAX_STARTUP_SECONDS loosens it on a slow machine
    limit = float(os.environ.get("TINV_MAX_STARTUP_SECONDS", "30"))
    assert cp.startup_seconds < limit, cp.timings


def test_python_client_uses_the_kubeconfig(control_plane):
    from kubernetes import client

    with control_plane.api_client() as api:
        names = [ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items]
    assert {"default", "kube-system"} <= set(names)


def test_rbac_is_enforced_for_service_accounts_and_impersonation(control_plane, namespace):
    cp, ns = control_plane, namespace
    cp.kubectl("create", "serviceaccount", "operator", "-n", ns)
    kubeconfig = cp.token_kubeconfig(ns, "operator")
    as_sa = f"--as=system:serviceaccount:{ns}:operator"

    # no permissions yet: a bound token and impersonation are both refused
    with pytest.raises(KubectlError) as exc:
        cp.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig)
    assert "forbidden" in str(exc.value).lower()
    assert cp.kubectl("auth", "can-i", "create", "jobs.batch", "-n", ns, as_sa, check=False).stdout.strip() == "no"

    cp.kubectl("create", "role", "jobs", "-n", ns, "--verb=get,list,watch,create,delete", "--resource=jobs.batch,pods")
    cp.kubectl("create", "rolebinding", "operator-jobs", "-n", ns, "--role=jobs", f"--serviceaccount={ns}:operator")
    cp.wait_for(lambda: cp.kubectl("auth", "can-i", "create", "jobs.batch", "-n", ns, as_sa,
                                   check=False).stdout.strip() == "yes", 10, what="the RoleBinding to apply")
    cp.kubectl("get", "pods", "-n", ns, kubeconfig=kubeconfig)
    cp.kubectl("get", "jobs", "-n", ns, as_sa)
    # ... and only in that namespace, only those resources
    assert cp.kubectl("auth", "can-i", "list", "pods", "-n", "default", as_sa, check=False).stdout.strip() == "no"
    assert cp.kubectl("auth", "can-i", "get", "secrets", "-n", ns, as_sa, check=False).stdout.strip() == "no"
    whoami = json.loads(cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:operator"


def test_helm_installs_a_chart(control_plane, namespace, tmp_path):
    cp, ns = control_plane, namespace
    if not cp.helm_path:
        pytest.skip("no helm binary")
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ .Release.Name }}-probe
        data:
          greeting: {{ .Values.greeting | quote }}
        """))
    assert cp.helm("version", "--short").stdout.startswith("v3.")
    cp.helm("install", "p1", str(chart), "-n", ns, "--set", "greeting=hi", "--wait", "--timeout=60s")
    cm = cp.get_json("configmap", "p1-probe", "-n", ns)
    assert cm["data"]["greeting"] == "hi"
    assert "p1" in cp.helm("list", "-n", ns, "-q").stdout
    cp.helm("uninstall", "p1", "-n", ns, "--wait")
    assert cp.kubectl("get", "configmap", "p1-probe", "-n", ns, check=False).returncode != 0


def test_the_machines_kubectl_uses_the_kubeconfig_too(control_plane):
    import shutil
    import subprocess

    system = shutil.which("kubectl", path=os.defpath + ":/usr/local/bin")
    if not system or os.path.realpath(system) == os.path.realpath(control_plane.kubectl_path):
        pytest.skip("no other kubectl on this machine")
    out = subprocess.run([system, "--kubeconfig", control_plane.kubeconfig, "get", "nodes", "-o", "name"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "node/" in out.stdout or not control_plane.nodes


def test_kopf_runs_against_the_kubeconfig(control_plane, namespace, tmp_path):
    """The operator's framework logs in with the harness kubeconfig (client certificates) and reacts."""
    import subprocess
    import sys

    pytest.importorskip("kopf")
    cp, ns = control_plane, namespace
    op = tmp_path / "probe_operator.py"
    op.write_text(textwrap.dedent("""\
        import kopf

        @kopf.on.startup()
        def configure(settings, **_):
            settings.watching.server_timeout = 10
            settings.posting.enabled = False

        @kopf.on.create("configmaps", labels={"tinv-probe": "yes"})
        def created(patch, **_):
            patch.metadata.annotations["tinv.io/seen-by"] = "kopf"
        """))
    log = open(tmp_path / "kopf.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", f"--namespace={ns}", str(op)],
                            env=cp.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        cp.create({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "probe", "labels": {"tinv-probe": "yes"}}}, ns)
        cp.wait_for(lambda: (cp.get_json("configmap", "probe", "-n", ns)["metadata"].get("annotations") or {})
                    .get("tinv.io/seen-by") == "kopf", 60, what="kopf to annotate the ConfigMap")
    except TimeoutError:
        log.flush()
        pytest.fail("kopf did not react:\n" + (tmp_path / "kopf.log").read_text()[-3000:])
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
