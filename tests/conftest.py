"""Shared fixtures: one local Ray cluster per test session, a moto S3 server (credentials and
IAM policies checked on request), demo data."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# As Ray's own tests do: one footer-reading actor, so small clusters cannot starve.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=4,  # more logical CPUs than cores: I/O tasks + actor pool cannot deadlock
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real HTTP S3 endpoint on loopback (moto's standalone server); yields storage options."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing-access-key",
        "secret": "testing-secret-key",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    yield options
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, str], request: pytest.FixtureRequest) -> str:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["key"],
        aws_secret_access_key=s3_server["secret"],
        region_name="us-east-1",
    )
    name = "bucket-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.datasets.demo import build_demo

    return build_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture
def output_dir(tmp_path: Path) -> str:
    return str(tmp_path / "output")


def _moto_auth(endpoint_url: str, enforce: bool) -> None:
    """Turn moto's credential and IAM-policy checks on or off (its /moto-api/reset-auth)."""
    import urllib.request

    request = urllib.request.Request(
        f"{endpoint_url}/moto-api/reset-auth",
        data=b"0" if enforce else b"inf",  # requests served before checks start
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture
def s3_iam(s3_server: dict[str, str]) -> Iterator[Callable[[list[dict[str, Any]]], dict[str, Any]]]:
    """For one test, the S3 server checks credentials and IAM policies.

    Yields `user(statements)`: storage options of a new IAM user allowed only `statements`.
    Keys it does not know are refused. Checks are off again after the test.
    """
    import json

    import boto3

    admin = {k: v for k, v in s3_server.items() if k != "client_kwargs"}
    iam = boto3.client(
        "iam", endpoint_url=admin["endpoint_url"], aws_access_key_id=admin["key"],
        aws_secret_access_key=admin["secret"], region_name="us-east-1",
    )  # fmt: skip

    def user(statements: list[dict[str, Any]]) -> dict[str, Any]:
        _moto_auth(s3_server["endpoint_url"], enforce=False)
        name = f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        _moto_auth(s3_server["endpoint_url"], enforce=True)
        return {**s3_server, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    try:
        yield user
    finally:
        _moto_auth(s3_server["endpoint_url"], enforce=False)
