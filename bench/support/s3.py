"""moto as the benchmarks' S3 server on loopback, and clients for it.

Two ways to run it: ``moto_process`` starts moto's standalone server as a process of its own (its
CPU can be read apart from the bench's: ``MotoProcess.cpu_seconds``); ``moto_thread`` runs it on a
thread of the bench and hands out its backend, so that a bucket can be filled without HTTP. Neither
checks signatures: any key pair in ``S3Endpoint`` is accepted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.measure import process_cpu_seconds
from support.processes import free_port

REGION = "us-east-1"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 server on loopback and the credentials the bench signs with."""

    url: str
    access_key_id: str = "AKIABENCHBENCHBENCH0"
    secret_access_key: str = "bench-secret-bench-secret-bench-secret-0"

    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server, isolated from any ~/.aws of the machine."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key)

    def create_bucket(self, name: str | None = None) -> str:
        """Bucket ``name`` (a fresh ``bench-<random>`` one if not given)."""
        bucket = name or f"bench-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def empty_bucket(self, bucket: str) -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])


@dataclass(frozen=True)
class MotoProcess:
    process: subprocess.Popen[bytes]
    endpoint: S3Endpoint

    def cpu_seconds(self) -> float:
        """The server's CPU so far: read before and after a run, the S3 work counts against that run."""
        return process_cpu_seconds(self.process.pid)


@contextmanager
def moto_process(log_dir: Path, timeout: float = 30.0) -> Iterator[MotoProcess]:
    """moto's standalone server on a free loopback port (log in ``log_dir/moto.log``), stopped at the end."""
    port = free_port()
    with open(log_dir / "moto.log", "wb") as log:
        process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.1)
        yield MotoProcess(process, S3Endpoint(f"http://127.0.0.1:{port}"))
    finally:
        process.terminate()
        process.wait()


@contextmanager
def moto_thread() -> Iterator[tuple[S3Endpoint, Any]]:
    """moto's server on a thread of this process, and its S3 backend (``put_object`` without HTTP)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Endpoint(f"http://127.0.0.1:{port}"), s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    finally:
        server.stop()
