"""A real S3 server on loopback (moto) with one bucket, for tests that read or write s3://."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[Any, dict]]:
    """Yields ``(s3fs filesystem, storage options)`` for a fresh moto server bound to 127.0.0.1
    holding an empty ``bucket``; the server stops on exit."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
        boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                     **options["client_kwargs"]).create_bucket(Bucket=bucket)
        yield s3fs.S3FileSystem(skip_instance_cache=True, **options), options
    finally:
        server.stop()
