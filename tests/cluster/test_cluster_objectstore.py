"""The S3-compatible object store of the end-to-end tests is a real server on loopback."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster


def test_s3_server_round_trip(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("ckpt")
    assert s3_server.make_bucket("ckpt") == "ckpt", "make_bucket is idempotent"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    s3.put_object(Bucket=bucket, Key="ns/job-1234abcd/progress.json", Body=b'{"step": 3}',
                  ContentType="application/json", Metadata={"tinv-step": "3"})
    head = s3.head_object(Bucket=bucket, Key="ns/job-1234abcd/progress.json")
    assert head["ContentType"] == "application/json" and head["Metadata"] == {"tinv-step": "3"}
    got = s3.get_object(Bucket=bucket, Key="ns/job-1234abcd/progress.json")["Body"].read()
    assert got == b'{"step": 3}'
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="ns/", Delimiter="/")
    assert [p["Prefix"] for p in listed.get("CommonPrefixes", [])] == ["ns/job-1234abcd/"]
    s3.delete_object(Bucket=bucket, Key="ns/job-1234abcd/progress.json")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_s3_server_multipart_upload(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket()
    part = b"x" * (5 * 1024 * 1024)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big.safetensors")
    etags = []
    for number, body in enumerate((part, b"tail"), start=1):
        r = s3.upload_part(Bucket=bucket, Key="big.safetensors", UploadId=upload["UploadId"], PartNumber=number, Body=body)
        etags.append({"PartNumber": number, "ETag": r["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key="big.safetensors", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": etags})
    assert s3.head_object(Bucket=bucket, Key="big.safetensors")["ContentLength"] == len(part) + 4


def test_s3_server_checks_credentials(s3_server):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    bucket = s3_server.make_bucket()
    wrong = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                         aws_secret_access_key="not-the-secret", region_name=s3_server.region,
                         config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as exc:
        wrong.list_objects_v2(Bucket=bucket)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
