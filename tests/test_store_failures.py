"""What a user sees when the object store fails: a refused request (403), a missing bucket, an endpoint
that does not answer or hangs, in the command line and in DataLoader workers. Every store here is a
real S3 HTTP endpoint (moto's server) or a real socket; nothing of s3fs or botocore is patched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cameo_corr.cli import main as cli_main

pytest.importorskip("s3fs")

HERE = Path(__file__).parent


def _cli(*argv: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cameo_corr.cli", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def _bucket_exists(endpoint, name: str) -> bool:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **endpoint.storage_options).exists(name)


@pytest.fixture
def refusing_endpoint():
    """A second S3 endpoint, in its own process, that checks credentials (moto with IAM enforced from
    the first request): every request with the tests' keys is refused with HTTP 403."""
    code = ("import os, sys; os.environ['INITIAL_NO_AUTH_ACTION_COUNT'] = '0'\n"
            "from moto.server import ThreadedMotoServer\n"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start()\n"
            "print('http://%s:%d' % s.get_host_and_port(), flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def test_a_refused_request_names_the_cache(refusing_endpoint):
    """A 403 reaches s3fs as a ``PermissionError`` without a file name: the line names the cache the
    command opened, exit 2 (a bad path or credentials, as a local permission error)."""
    env = {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": refusing_endpoint, "AWS_ENDPOINT_URL_S3": refusing_endpoint}
    for command in (["cache", "verify", "s3://bkt/c"], ["cache", "stats", "s3://bkt/c"]):
        out = _cli(*command, env=env)
        assert (out.returncode, out.stderr.strip()) == (2, f"cameo-corr {' '.join(command[:2])}: error: object store: forbidden, s3://bkt/c")
    # refused is not missing: credentials allowed only a prefix of a bucket cannot head or list it, and
    # a run must not be refused as "no such bucket" for that (s3fs's ``exists`` says False there)
    from cameo_corr.cache.location import CacheLocation

    options = {"key": "wrong", "secret": "wrong", "client_kwargs": {"endpoint_url": refusing_endpoint, "region_name": "us-east-1"}}
    assert CacheLocation("s3://bkt/c", options).missing_bucket() is None


def test_a_missing_bucket_is_named_and_never_created(s3_endpoint, s3_bucket, tmp_path, monkeypatch, capsys):
    """Reading from a bucket that does not exist says so; ``cache merge --out`` into one is refused
    before anything is written (as ``preprocess`` refuses it), and no command creates the bucket
    (fsspec's ``makedirs`` on s3 would: a typo in ``--out`` must not become a new bucket). The merged
    cache's recorded command keeps no credential."""
    from test_cache import config, outcomes

    from cameo_corr.cache.location import CacheLocation
    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.writer import CacheWriter

    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    options = s3_endpoint.cli_options()
    for name, windows in (("a", [0, 1]), ("b", [2, 3])):
        writer = CacheWriter(f"{s3_bucket}/{name}", config(), storage_options=s3_endpoint.storage_options)
        writer.initialize()
        writer.write_shard(f"s{name}", outcomes(windows))
    missing = "s3://no-such-bucket-cameo"
    assert cli_main(["cache", "stats", f"{missing}/c", *options]) == 2
    assert capsys.readouterr().err.strip() == f"cameo-corr cache stats: error: {missing}/c: no such bucket: no-such-bucket-cameo"
    assert cli_main(["cache", "merge", f"{s3_bucket}/a", f"{s3_bucket}/b", "--out", f"{missing}/m", *options]) == 2
    assert capsys.readouterr().err.strip() == f"cameo-corr cache merge: error: {missing}/m [out]: no such bucket: no-such-bucket-cameo"
    synth = tmp_path / "synth"
    assert cli_main(["synthesize", "--out", str(synth), "--scenes", "1", "--frames", "6", "--size", "32"]) == 0
    capsys.readouterr()
    for dry in ([], ["--dry-run"]):  # refused before Ray starts, and a dry run says so too
        argv = ["preprocess", "--dataset", "synthetic", "--root", str(synth), "--out", f"{missing}/p", "--backend", "depth"]
        assert cli_main([*argv, *options, *dry]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"cameo-corr preprocess: error: --out {missing}/p: no such bucket: no-such-bucket-cameo")
    with pytest.raises(FileNotFoundError):  # a shard written into a missing bucket: refused, no bucket made
        CacheLocation(f"{missing}/m", s3_endpoint.storage_options).write_bytes_atomic("shards/x.zarr.zip", b"x")
    assert not _bucket_exists(s3_endpoint, missing[5:])

    assert cli_main(["cache", "merge", f"{s3_bucket}/a", f"{s3_bucket}/b", "--out", f"{s3_bucket}/m", *options]) == 0
    merged = CorrCache(f"{s3_bucket}/m", s3_endpoint.storage_options)
    assert len(merged) == 4
    command = merged.config.created_by["command"]
    assert "--storage-option=key=***" in command and "testing" not in command  # the credentials' values
    assert s3_endpoint.url in command  # the endpoint is no secret: the recorded command names where it ran


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_in_a_dataloader_worker_is_raised_as_itself(tiny_train_cache, s3_endpoint, s3_bucket):
    """PyTorch rebuilds a worker's error from its message, which botocore's errors cannot take: the
    store's error is carried out of the worker and raised as itself, and the command line prints one
    line naming the endpoint and the cache."""
    from botocore.exceptions import EndpointConnectionError
    from test_local_cache import upload

    from cameo_corr.train.data import CorrStreamDataset, StreamLoader

    url = upload(tiny_train_cache, s3_bucket, s3_endpoint.storage_options)
    ds = CorrStreamDataset(url, num_views=3, resolution=32, seed=3, batch_size=2, num_epochs=1,
                           storage_options=s3_endpoint.storage_options)
    gone = f"http://127.0.0.1:{_closed_port()}"  # the store goes away after the dataset was built
    ds.storage_options = {**s3_endpoint.storage_options, "client_kwargs": {"endpoint_url": gone, "region_name": "us-east-1"},
                          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(EndpointConnectionError, match=gone):
        list(StreamLoader(ds, num_workers=1, multiprocessing_context="fork"))


@pytest.fixture
def hung_endpoint():
    """An endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield "http://127.0.0.1:%d" % server.getsockname()[1]
    finally:
        server.close()
        for c in held:
            c.close()


def test_a_hung_endpoint_fails_within_the_timeouts_the_readme_gives(hung_endpoint):
    """botocore waits 60 s per read and retries, s3fs retries again: a hung endpoint blocks a command for
    minutes by default. The README's ``config_kwargs`` bound it: one line naming the endpoint and the
    cache, exit 1, in seconds."""
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    timeouts = {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}
    start = time.monotonic()
    out = _cli("cache", "verify", "s3://bkt/c", f"--storage-option=client_kwargs={json.dumps({'endpoint_url': hung_endpoint})}",
               f"--storage-option=config_kwargs={json.dumps(timeouts)}", env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith("cameo-corr cache verify: error: object store: Read timeout on endpoint URL: ")
    assert hung_endpoint in out.stderr and out.stderr.strip().endswith(", s3://bkt/c")  # the endpoint and the cache
    assert elapsed < 60, elapsed


def test_an_option_s3fs_does_not_take_is_refused_before_any_request(capsys):
    """s3fs passes unknown options on to aiobotocore's session, which raised a ``TypeError`` at the first
    request: the option is named at once (no endpoint is contacted: none is given)."""
    assert cli_main(["cache", "verify", "s3://bkt/c", "--storage-option", "retries=3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cameo-corr cache verify: error: s3://bkt/c: s3fs takes no storage option 'retries' "
        "(botocore's settings, such as timeouts and retries, go in config_kwargs)")


def test_missing_credentials_are_bad_input_naming_the_cache(tmp_path):
    """No credentials anywhere (no ``AWS_*`` keys, no ``~/.aws``, no instance metadata): one line naming
    the cache, exit 2, as a refused request."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}")
    out = subprocess.run([sys.executable, "-m", "cameo_corr.cli", "cache", "stats", "s3://bkt/c"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert (out.returncode, out.stderr.strip()) == (2, "cameo-corr cache stats: error: object store: Unable to locate credentials, s3://bkt/c")


def test_storage_options_for_a_training_run_without_a_url_cache_are_refused(tmp_path, capsys):
    """``train --storage-option`` when no cache is a URL: refused naming the caches, not silently ignored."""
    cache = tmp_path / "c"
    assert cli_main(["train", "--cache", str(cache), "--storage-option", "anon=true", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"cameo-corr train: error: field 'storage_options': given, but no cache is a URL "
                                               f"({cache}); storage options apply to s3:// and other URL caches")
