"""A grid in object storage: a real S3-compatible server on loopback (the harness's versitygw).

Concepts read from s3://, images/index/gallery written there with browser-friendly content types,
resume by listing the bucket, and `tinv reproduce s3://...`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gridkit import TOKEN, vectors
from tinv.trainer import generate as G, pngmeta, runtime
from tinv.trainer import cli as trainer_cli

pytestmark = pytest.mark.cluster


def test_grid_in_object_storage(s3_server, make_grid, monkeypatch, tmp_path):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    from safetensors.torch import save

    s3.put_object(Bucket=bucket, Key="concepts/blob/learned_embeds.safetensors", Body=save({TOKEN: vectors()}))
    grid = make_grid(
        spec={"embeddings": [{"uri": f"s3://{bucket}/concepts/blob"}],
              "storage": {"uri": f"s3://{bucket}/tinv", "endpoint": s3_server.endpoint_url, "addressingStyle": "path"}},
    )
    with pytest.raises(runtime.Stopped):
        G.run_grid(grid, G.GridOptions(stop_after_batches=1, progress_bar=False))
    res = G.run_grid(grid, G.GridOptions(progress_bar=False))
    assert (res.rendered, res.skipped, res.complete) == (5, 3, True)
    prefix = "tinv/ns/g-local/"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    pngs = sorted(k for k in keys if k.startswith(prefix + "images/p") and k.endswith(".png"))
    assert len(pngs) == 8
    assert {prefix + "images/index.html", prefix + "images/index.json", prefix + "images/sheets/p000.png", prefix + "progress.json"} <= keys
    assert any(k.startswith(prefix + "tensorboard/generate-000-of-001/events.out.tfevents") for k in keys)
    head = lambda k: s3.head_object(Bucket=bucket, Key=k)["ContentType"]  # noqa: E731
    assert head(prefix + "images/index.html").startswith("text/html"), "the gallery opens in a browser from the bucket"
    assert head(pngs[0]) == "image/png"
    progress = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "progress.json")["Body"].read())
    assert progress["state"] == "succeeded" and progress["images_done"] == 8
    meta = pngmeta.read_png_metadata(s3.get_object(Bucket=bucket, Key=pngs[2])["Body"].read())
    assert meta["embeddings"][0]["uri"] == f"s3://{bucket}/concepts/blob"

    out = tmp_path / "again.png"
    assert trainer_cli.main(["reproduce", f"s3://{bucket}/{pngs[2]}", "--out", str(out), "--check"]) == 0
    original = pngmeta.decode_png(s3.get_object(Bucket=bucket, Key=pngs[2])["Body"].read())
    assert np.array_equal(original, pngmeta.decode_png(out.read_bytes()))
