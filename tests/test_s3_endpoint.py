"""The S3 endpoint the object-storage tests use is real HTTP: s3fs reaches it with storage options and
with the ``AWS_*`` environment alone, and a bucket's objects are what was written."""

from __future__ import annotations

import subprocess
import sys
import urllib.request


def test_endpoint_speaks_http_and_s3fs_reaches_it_both_ways(s3_endpoint, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    fs.pipe(f"{s3_bucket}/a/b.txt", b"hello")
    assert fs.cat(f"{s3_bucket}/a/b.txt") == b"hello"
    # a plain HTTP GET of the bucket listing (no SDK): the object is served by a real server
    with urllib.request.urlopen(f"{s3_endpoint.url}/{s3_bucket[5:]}") as r:
        assert b"a/b.txt" in r.read()
    # a fresh process with only AWS_* in its environment (no storage options) reads it through s3fs
    code = f"import s3fs; print(s3fs.S3FileSystem().cat({s3_bucket + '/a/b.txt'!r}).decode())"
    out = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", **s3_endpoint.env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "hello", out.stderr[-2000:]
