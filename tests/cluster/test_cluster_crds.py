"""The generated CRDs against a real apiserver: they apply and become Established, kubectl shows their
printer columns, CEL rules refuse bad resources with their messages, undeclared fields are pruned,
and the garbage collector follows owner references from custom resources.

Expected messages are read from deploy/crds, so rewording a rule in tinv.api does not break these
tests, while a rule the apiserver does not enforce does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from harness import KubectlError
from harness.controlplane import CRD_DIR

pytestmark = pytest.mark.cluster

TIJOB_FILE = CRD_DIR / "tinv.io_textualinversionjobs.yaml"


def crd(path: Path = TIJOB_FILE) -> dict:
    if not path.exists():
        pytest.skip(f"{path} not generated yet (make crds)")
    return yaml.safe_load(path.read_text())


def schema_at(doc: dict, *path: str) -> dict:
    node = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def cel_message(doc: dict, *path: str, contains: str = "") -> str:
    rules = schema_at(doc, *path).get("x-kubernetes-validations") or []
    for rule in rules:
        if contains in rule["rule"] or contains in rule["message"]:
            return rule["message"]
    pytest.fail(f"no CEL rule at {'.'.join(path)} matching {contains!r} in {TIJOB_FILE.name}: {rules}")


def tijob(name: str, **spec_overrides) -> dict:
    spec = {
        "model": {"source": "builtin:tiny"},
        "concepts": [{"token": "<cat-toy>", "initializer": "toy", "images": "s3://tinv-test/cat-toy/"}],
        "resources": {"gpuClass": "A100_PCIE_80GB", "region": "ORD1"},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "metadata": {"name": name}, "spec": spec}


def refused(cp, manifest: dict, ns: str, *extra: str) -> str:
    proc = cp.kubectl("apply", "-n", ns, *extra, "-f", "-", input=json.dumps(manifest), check=False)
    assert proc.returncode != 0, f"the apiserver accepted an invalid resource:\n{proc.stdout}"
    return proc.stderr


def test_crds_apply_and_are_established(control_plane, tinv_crds):
    cp = control_plane
    assert "textualinversionjobs.tinv.io" in tinv_crds
    # every file in deploy/crds must apply (the apiserver checks what no offline tool does: CEL cost,
    # rules against defaults, structural schema), and applying again changes nothing
    files = cp.crd_files()
    names = cp.apply_crds()
    assert names == cp.apply_crds(), "apply_crds is idempotent"
    assert len(names) >= len(files) and "generationgrids.tinv.io" in names, names
    for name in names:
        obj = cp.get_json("crd", name)
        conds = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
        assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True", conds
        assert conds.get("NonStructuralSchema", "False") == "False", f"{name} is not structural"
    resources = cp.kubectl("api-resources", "--api-group=tinv.io", "-o", "wide").stdout
    assert "textualinversionjobs" in resources and "tijob" in resources


def test_kubectl_get_tijobs_shows_the_printer_columns(control_plane, tinv_crds, namespace):
    cp, ns = control_plane, namespace
    doc = crd()
    columns = doc["spec"]["versions"][0]["additionalPrinterColumns"]
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(tijob("cat-toy")))
    status = {"phase": "Running", "progress": {"step": 120, "totalSteps": 500, "summary": "120/500 (24%)", "loss": 0.125}}
    cp.kubectl("patch", "tijob", "cat-toy", "-n", ns, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))

    out = cp.kubectl("get", "tijobs", "-n", ns).stdout
    header, row = out.splitlines()[0].split(), out.splitlines()[1]
    expected = ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]
    assert header == expected, out
    for value in ("cat-toy", "Running", "120/500", "0.125", "A100_PCIE_80GB"):
        assert value in row, out
    wide = cp.kubectl("get", "tijob", "-n", ns, "-o", "wide").stdout.splitlines()[0].split()
    assert [c["name"].upper() for c in columns if c.get("priority")] and all(
        c["name"].upper() in wide for c in columns), wide
    # the short name and the category work like any built-in resource
    assert "cat-toy" in cp.kubectl("get", "tinv", "-n", ns).stdout


def test_invalid_resources_are_refused_with_the_cel_message(control_plane, tinv_crds, namespace):
    cp, ns = control_plane, namespace
    doc = crd()

    bad = tijob("bad-resolution", training={"resolution": 500})
    msg = cel_message(doc, "spec", "training", "resolution", contains="% 8")
    err = refused(cp, bad, ns)
    assert msg in err and "spec.training.resolution" in err, err

    twice = {"token": "<cat-toy>", "initializer": "toy", "images": "s3://tinv-test/other/"}
    bad = tijob("duplicate-tokens", concepts=[twice, dict(twice)])
    msg = cel_message(doc, "spec", "concepts", contains="exists_one")
    err = refused(cp, bad, ns)
    assert msg in err, err

    bad = tijob("bad-model", model={"source": "builtin:huge"})
    msg = cel_message(doc, "spec", "model", contains="builtin:")
    err = refused(cp, bad, ns)
    assert msg in err and "spec.model.source" in err, err

    # the same messages reach the Python client (what kopf and the operator see)
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with cp.api_client() as api:
        with pytest.raises(ApiException) as exc:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                "tinv.io", "v1alpha1", ns, "textualinversionjobs", tijob("py", training={"resolution": 1001}))
    assert exc.value.status == 422
    assert cel_message(doc, "spec", "training", "resolution", contains="% 8") in exc.value.body


def test_transition_rules_make_the_spec_immutable(control_plane, tinv_crds, namespace):
    cp, ns = control_plane, namespace
    doc = crd()
    good = tijob("frozen")
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(good))
    changed = copy.deepcopy(good)
    changed["spec"]["model"] = {"source": "runwayml/stable-diffusion-v1-5"}
    err = refused(cp, changed, ns)
    assert cel_message(doc, "spec", "model", contains="oldSelf") in err, err


def test_fields_not_in_the_schema_are_pruned(control_plane, tinv_crds, namespace):
    from kubernetes import client

    cp, ns = control_plane, namespace
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(tijob("pruned")))
    with cp.api_client() as api:
        objs = client.CustomObjectsApi(api)
        objs.patch_namespaced_custom_object_status(
            "tinv.io", "v1alpha1", ns, "textualinversionjobs", "pruned",
            {"status": {"phase": "Pending", "notInTheSchema": "x",
                        "progress": {"step": 1, "inventedCounter": 7}}},
        )
        obj = objs.get_namespaced_custom_object("tinv.io", "v1alpha1", ns, "textualinversionjobs", "pruned")
    assert obj["status"]["phase"] == "Pending"
    assert obj["status"]["progress"] == {"step": 1}, obj["status"]
    assert "notInTheSchema" not in obj["status"]
    # spec too (the unknown field is dropped before the transition rule compares old and new),
    # and the schema's defaults were applied by the apiserver
    with cp.api_client() as api:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            "tinv.io", "v1alpha1", ns, "textualinversionjobs", "pruned", {"spec": {"training": {"inventedKnob": 3}}})
    obj = cp.get_json("tijob", "pruned", "-n", ns)
    assert "inventedKnob" not in obj["spec"].get("training", {})
    assert obj["spec"]["training"].get("resolution") == schema_at(crd(), "spec", "training", "resolution").get("default")
    # kubectl patch warns about the dropped field ...
    proc = cp.kubectl("patch", "tijob", "pruned", "-n", ns, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {"notInTheSchema": "x"}}))
    assert 'unknown field "status.notInTheSchema"' in proc.stderr, proc.stderr
    assert "notInTheSchema" not in cp.get_json("tijob", "pruned", "-n", ns)["status"]
    # ... and kubectl create/apply (strict field validation by default) refuse it outright
    bad = tijob("typo")
    bad["spec"]["trainnig"] = {"steps": 10}
    with pytest.raises(KubectlError) as exc:
        cp.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(bad))
    assert 'unknown field "spec.trainnig"' in str(exc.value)


def test_deleting_a_custom_resource_garbage_collects_its_children(control_plane, tinv_crds, namespace):
    cp, ns = control_plane, namespace
    if "kube-controller-manager" in cp.missing_components:
        pytest.skip("needs kube-controller-manager (garbage collector)")
    owner = json.loads(cp.kubectl("apply", "-n", ns, "-f", "-", "-o", "json", input=json.dumps(tijob("owner"))).stdout)
    ref = {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    cp.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner-spec", "ownerReferences": [ref]},
               "data": {"job.yaml": "{}"}}, ns)
    cp.kubectl("delete", "tijob", "owner", "-n", ns, "--wait=false")
    # the garbage collector discovers new resource types every 30 s, so allow for one resync
    cp.wait_for(lambda: cp.kubectl("get", "configmap", "owner-spec", "-n", ns, check=False).returncode != 0, 90,
                what="the garbage collector to delete the ConfigMap owned by the TextualInversionJob")
