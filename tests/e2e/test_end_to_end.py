"""The whole path, for real: helm install -> operator (as the chart's ServiceAccount) -> kubectl apply ->
a GPU Job scheduled on a fake CoreWeave node -> the trainer really trains on the tiny model against a
real S3 server on loopback -> status shows checkpoint uuids and s3:// URIs -> a GenerationGrid that
references the job renders its images and its status shows the gallery URI.

Nothing is mocked: the apiserver, etcd, controllers and scheduler are the real binaries, KWOK plays
the kubelet's pod-status part, and the node agent (tests/harness/nodeagent.py) runs each scheduled
pod's command on this machine with the env, Secrets and volumes its spec names.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from pathlib import Path

import pytest
import yaml

from cluster.operator_helpers import OperatorProcess, free_port
from harness.nodeagent import NodeAgent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"
IMAGES = REPO / "examples" / "images" / "det-logo"


def _operator_env_from_chart(cp, ns: str) -> dict[str, str]:
    """The operator container's env exactly as the installed chart's Deployment defines it, with
    secretKeyRef and fieldRef values resolved the way the kubelet would."""
    manifest = cp.helm("get", "manifest", "tinv", "-n", ns).stdout
    deploy = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["operator"]
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            secret = cp.get_json("secret", ref["name"], "-n", ns)
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "fieldRef" in item.get("valueFrom", {}):
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert field in ("metadata.namespace", "metadata.name")
            env[item["name"]] = ns if field == "metadata.namespace" else "tinv-e2e-0"  # the pod's name (leader identity)
    return env


def _wait(cp, predicate, timeout, what, diagnostics):
    try:
        return cp.wait_for(predicate, timeout=timeout, interval=1.0, what=what)
    except Exception as err:  # noqa: BLE001 - add every log that explains the failure
        raise AssertionError(f"{err}\n{diagnostics()}") from None


def _succeeded(cp, ns: str, kind: str, name: str, needs: str, diagnostics):
    """A predicate: the resource once it is Succeeded with status.<needs> set; a Failed one fails the test at once."""

    def check():
        obj = cp.get_json(kind, name, "-n", ns)
        status = obj.get("status") or {}
        if status.get("phase") == "Failed":
            raise AssertionError(f"{kind} {name} failed: {json.dumps(status, indent=1)}\n{diagnostics()}")
        return obj if status.get("phase") == "Succeeded" and status.get(needs) else None

    return check


def test_helm_install_train_and_generate_end_to_end(control_plane, tinv_crds, s3_server, tmp_path):
    cp = control_plane
    ns = cp.new_namespace("e2e")
    bucket = s3_server.make_bucket("tinv-e2e")
    s3 = s3_server.client()

    # The user's side: upload the concept's images, create the storage Secret, install the chart.
    for png in sorted(IMAGES.glob("*.png")):
        s3.upload_file(str(png), bucket, f"data/det-logo/{png.name}")
    cp.kubectl("create", "secret", "generic", "tinv-s3", "-n", ns,
               f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
               f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}")
    install = cp.helm(
        "install", "tinv", str(CHART), "-n", ns, "--skip-crds",
        "--set", f"defaults.storage.uri=s3://{bucket}/runs",
        "--set", f"defaults.storage.endpoint={s3_server.endpoint_url}",
        "--set", "defaults.storage.addressingStyle=path",
        "--set", "defaults.storage.credentialsSecret=tinv-s3",
        "--set", "defaults.gpuClass=A100_PCIE_80GB", "--set", "defaults.region=ORD1",
        "--set", "pollIntervalSeconds=1",
    )
    assert "get tijobs" in install.stdout

    # The operator runs with the chart's env and *only* its ServiceAccount's token: RBAC is real.
    env = _operator_env_from_chart(cp, ns)
    env.update({"KUBECONFIG": cp.token_kubeconfig(ns, "tinv"), "TINV_METRICS_PORT": str(free_port()),
                "TINV_HEALTH_PORT": str(free_port())})
    env.pop("TINV_TERMINATION_MESSAGE_PATH", None)
    op = OperatorProcess(cp, [ns], tmp_path / "operator", env=env)
    op.args = [sys.executable, "-m", "tinv.api.cli", "operator"]
    op.env = {k: v for k, v in {**os.environ, **env, "PYTHONUNBUFFERED": "1"}.items()
              if not k.startswith(("AWS_ENDPOINT", "TINV_CACHE"))}
    agent = NodeAgent(cp, ns, tmp_path / "node", timeout=900)
    stop = threading.Event()
    serve = threading.Thread(target=agent.serve, args=("tinv.io/kind", stop), daemon=True)

    def diagnostics() -> str:
        runs = "\n".join(f"--- pod {r.name} exit {r.exit_code}\n{r.log[-3000:]}" for r in agent.runs)
        objs = cp.kubectl("get", "tijobs,ggrids,jobs,pods", "-n", ns, "-o", "wide", check=False).stdout
        return f"{objs}\n{op.logs(120)}\n{runs}"

    with op:
        serve.start()
        try:
            job = {
                "apiVersion": "tinv.io/v1alpha1",
                "kind": "TextualInversionJob",
                "metadata": {"name": "det-logo"},
                "spec": {
                    "model": {"source": "builtin:tiny"},
                    "concepts": [{"token": "det-logo", "initializer": "brain logo, sharp lines, connected circles",
                                  "images": f"s3://{bucket}/data/det-logo/"}],
                    "training": {"steps": 30, "batchSize": 2, "gradientAccumulation": 1, "resolution": 64,
                                 "checkpointEvery": 10, "checkpointsKept": 2, "logEvery": 5},
                    "resources": {"gpusPerWorker": 1},
                },
            }
            cp.kubectl("apply", "-f", "-", "-n", ns, input=yaml.safe_dump(job))

            done = _wait(cp, _succeeded(cp, ns, "tijob", "det-logo", "latestCheckpoint", diagnostics), 600,
                         "the TextualInversionJob to succeed", diagnostics)
            status = done["status"]
            latest = status["latestCheckpoint"]
            assert latest["step"] == 30 and latest["uri"].startswith(f"s3://{bucket}/runs/{ns}/det-logo-")
            assert [c["step"] for c in status["checkpoints"]] == [20, 30]  # checkpointsKept: 2
            assert status["progress"]["step"] == 30 and status["progress"]["totalSteps"] == 30
            assert {c["type"] for c in status["conditions"]} >= {"Accepted", "Succeeded"}
            key = latest["uri"][len(f"s3://{bucket}/"):]
            files = {o["Key"].rsplit("/", 1)[1] for o in s3.list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"]}
            assert {"learned_embeds.safetensors", "det-logo.pt", "learned_embeddings_dict.pt", "manifest.json"} <= files
            manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/manifest.json")["Body"].read())
            assert manifest["uuid"] == latest["uuid"] and manifest["step"] == 30

            # The pod ran where the spec said: a fake A100_PCIE_80GB node in ORD1, with a GPU request.
            (run,) = [r for r in agent.runs if r.name.startswith("det-logo")]
            assert run.exit_code == 0, run.log[-3000:]
            pod = cp.get_json("pod", run.name, "-n", ns)
            node = cp.node(pod["spec"]["nodeName"])
            assert (node.gpu_class, node.region) == ("A100_PCIE_80GB", "ORD1")
            assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert pod["spec"]["automountServiceAccountToken"] is False
            table = cp.kubectl("get", "tijobs", "-n", ns).stdout
            assert "Succeeded" in table and latest["uuid"] in table

            # A grid from the job's latest checkpoint, two parallel workers (two shards).
            grid = {
                "apiVersion": "tinv.io/v1alpha1",
                "kind": "GenerationGrid",
                "metadata": {"name": "det-logo-grid"},
                "spec": {
                    "model": {"source": "builtin:tiny"},
                    "embeddings": [{"job": "det-logo", "checkpoint": "latest"}],
                    "prompts": ["a watercolor painting of a det-logo", "a det-logo on a brick wall"],
                    "grid": {"guidanceScales": [1, 5], "steps": [4], "schedulers": ["ddim"], "seeds": [0, 1],
                             "sizes": [{"width": 64, "height": 64}]},
                    "batchSize": 4,
                    "precision": "fp32",
                    "resources": {"workers": 2, "gpusPerWorker": 1},
                },
            }
            cp.kubectl("apply", "-f", "-", "-n", ns, input=yaml.safe_dump(grid))

            gdone = _wait(cp, _succeeded(cp, ns, "ggrid", "det-logo-grid", "galleryUri", diagnostics), 600,
                          "the GenerationGrid to succeed", diagnostics)
            gstatus = gdone["status"]
            assert gstatus["resolvedEmbeddings"][0]["checkpoint"] == latest["uuid"]  # 'latest' made concrete
            assert gstatus["galleryUri"].startswith(f"s3://{bucket}/runs/{ns}/det-logo-grid-")
            assert gstatus["progress"]["imagesDone"] == gstatus["progress"]["imagesTotal"] == 8
            gkey = gstatus["galleryUri"][len(f"s3://{bucket}/"):]
            html = s3.get_object(Bucket=bucket, Key=gkey)["Body"].read().decode()
            images_prefix = gkey.rsplit("/", 1)[0] + "/"
            pngs = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=images_prefix)["Contents"] if o["Key"].endswith(".png")
                    and "/contact" not in o["Key"] and "sheet" not in o["Key"]]
            assert len(pngs) >= 8
            for key in pngs:
                if "sheet" not in key:
                    assert key.rsplit("/", 1)[1] in html
            shard_runs = [r for r in agent.runs if r.name.startswith("det-logo-grid")]
            assert len(shard_runs) == 2 and all(r.exit_code == 0 for r in shard_runs), diagnostics()
        finally:
            stop.set()
            serve.join(30)
