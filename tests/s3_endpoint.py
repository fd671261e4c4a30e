"""A real S3-compatible HTTP endpoint for the tests: moto's server (``moto[server]``) on a local port
that the kernel picks as the server binds, used through s3fs exactly as a user's bucket would be
(endpoint and credentials from the usual ``AWS_*`` variables or fsspec storage options). Nothing of s3fs is mocked: every request crosses HTTP."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Endpoint:
    """One running server: its URL, and how to reach it (storage options, environment, CLI flags)."""

    url: str
    server: Any = field(repr=False, default=None)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for a ``s3://`` URL on this endpoint."""
        return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.url, "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}}

    @property
    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point botocore (and so s3fs) at this endpoint."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url}

    def cli_options(self) -> list[str]:
        """``--storage-option`` flags equal to :attr:`storage_options`."""
        import json

        return [f"--storage-option={k}={json.dumps(v)}" for k, v in self.storage_options.items()]

    def new_bucket(self) -> str:
        """Create an empty bucket with a unique name; returns ``s3://<bucket>``."""
        import boto3

        name = f"b-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                              region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


def start_endpoint() -> S3Endpoint:
    """Start moto's threaded S3 server on 127.0.0.1 and return it. The server binds port 0 itself: a port
    probed free and bound later may be taken in between by another process (a parallel test worker's
    server, a Ray node), and moto's server thread then dies while ``start()`` waits for it forever."""
    from moto.server import ThreadedMotoServer

    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Endpoint(url=f"http://{host}:{port}", server=server)
