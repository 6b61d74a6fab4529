"""A real S3 API for tests: moto's server on 127.0.0.1, found the way a team's machines find
their bucket (the standard AWS variables)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.process import free_port

S3_BUCKET = "kd-team"


@contextmanager
def moto_server(bucket: str = S3_BUCKET) -> Iterator[str]:
    """Start moto's ``ThreadedMotoServer`` on a free port with ``bucket`` made; yields the endpoint.

    While it runs, ``AWS_ENDPOINT_URL`` (honoured by botocore and s3fs), test credentials and a
    region are set in ``os.environ`` (so subprocesses inherit them) and ``AWS_PROFILE`` /
    ``AWS_SESSION_TOKEN`` are unset; all of it is restored after. Needs ``moto[server]``.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "kd-test",
        "AWS_SECRET_ACCESS_KEY": "kd-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3_url(key: str, bucket: str = S3_BUCKET) -> str:
    """``s3://BUCKET/KEY``."""
    return f"s3://{bucket}/{key}"


def upload_dir(root: Path, prefix: str, bucket: str = S3_BUCKET) -> str:
    """Every file under ``root`` put as ``PREFIX/RELATIVE/PATH`` (bytes as they are, nothing
    checked): the URL of the copy. Needs the server running."""
    import boto3

    client = boto3.client("s3")
    for p in sorted(root.rglob("*")):
        if p.is_file():
            key = f"{prefix}/{p.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
    return s3_url(prefix, bucket)
