"""A real S3-compatible HTTP server for the tests: moto's standalone server, as its own process.

A pytest plugin: ``s3_server``, ``s3_env``, ``bucket_url`` and ``locked_bucket_url`` are available by
name everywhere.

The server enforces SigV4 authentication and IAM policies (``INITIAL_NO_AUTH_ACTION_COUNT``): the
first three requests create an IAM user with an ``s3:*`` and ``iam:*`` policy and its access key,
and every request after that must be signed and allowed, so wrong credentials fail exactly as
against AWS or MinIO, and ``S3Server.new_user`` makes users with narrower policies (append-only
workers). Each test gets a bucket of its own and an environment holding only the standard AWS
variables (no BACKUP_OBJECT_LOCK_* unless the test asks for a locked bucket).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
REGION = "eu-central-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on {port} within {timeout}s")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str = ""

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables for this server, isolated from any ~/.aws of the machine."""
        values = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key_id,
                  "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": REGION,
                  "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                  "AWS_EC2_METADATA_DISABLED": "true"}
        values.update(overrides)
        return values

    def admin_client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)

    def new_bucket(self, *, object_lock: bool = False, versioning: bool = False) -> str:
        """A fresh bucket; with ``object_lock`` created with Object Lock enabled (which turns versioning on)."""
        name = f"bt-test-{uuid.uuid4().hex[:12]}"
        client = self.admin_client()
        client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION},
                             ObjectLockEnabledForBucket=object_lock)
        if versioning and not object_lock:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def new_user(self, bucket: str, actions: list[str]) -> dict[str, str]:
        """An IAM user allowed only ``actions`` (``s3:PutObject``...) on ``bucket``: its AWS variables."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)
        name = f"bt-user-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": [
                f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return self.env(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])


def start_moto(log_path: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    import boto3

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        bootstrap = {"endpoint_url": endpoint, "region_name": "us-east-1",
                     "aws_access_key_id": "AKIABOOTSTRAPBOOTSTRAP", "aws_secret_access_key": "bootstrap" * 4}
        iam = boto3.client("iam", **bootstrap)  # type: ignore[arg-type]
        iam.create_user(UserName="backup-tasks")
        iam.put_user_policy(UserName="backup-tasks", PolicyName="s3-all", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="backup-tasks")["AccessKey"]
        return proc, S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    proc, server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's environment pointed at the test server (standard AWS variables only)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BACKUP_OBJECT_LOCK_", "BACKUP_PRUNE_AWS_")):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def bucket_url(s3_env: S3Server) -> str:
    """A fresh bucket, as the ``s3://bucket/prefix`` URL a user would put in BACKUP_DIR."""
    return f"s3://{s3_env.new_bucket()}/nightly/aitrapp"


@pytest.fixture
def locked_bucket_url(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket with Object Lock (so versioning) on, and this process locking what it writes there for a day.

    As a user sets it up: the bucket created with Object Lock enabled, and ``BACKUP_OBJECT_LOCK_DAYS=1``
    (GOVERNANCE) in the environment, which every storage opened from a URL applies.
    """
    monkeypatch.setenv("BACKUP_OBJECT_LOCK_DAYS", "1")
    monkeypatch.setenv("BACKUP_OBJECT_LOCK_MODE", "GOVERNANCE")
    return f"s3://{s3_env.new_bucket(object_lock=True)}/nightly/aitrapp"
