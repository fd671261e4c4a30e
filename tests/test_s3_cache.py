"""``cameo-corr preprocess --out s3://...`` end to end against a real S3 endpoint (moto's server over HTTP,
reached through s3fs): two jobs started together on one bucket (one refused by the lease), the cache
checked by ``cache verify --deep`` and equal to the pipeline functions called directly."""

from __future__ import annotations

import json

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

JOB_ARGS = ["--dataset", "synthetic", "--backend", "depth", "--grid", "8", "--views", "3", "--windows-per-scene", "2",
            "--crop-size", "48", "--shard-size", "2", "--workers", "1", "--num-cpus", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cameo_corr.datasets.synthetic import generate_dataset

    return Path(generate_dataset(tmp_path_factory.mktemp("data") / "synth", scenes=2, frames=6, image_size=48, seed=2))


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cameo_corr.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_jobs_on_one_bucket_one_refused_cache_equals_reference(s3_endpoint, data, monkeypatch, reference_of,
                                                                     assert_equals_reference):
    out = f"{s3_endpoint.new_bucket()}/caches/synth"
    env = {**os.environ, **s3_endpoint.env, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    # one job finds the endpoint in the AWS_* environment, the other in --storage-option flags
    by_env = cli("preprocess", "--root", str(data), "--out", out, *JOB_ARGS, env=env)
    plain = {k: v for k, v in env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    by_flags = cli("preprocess", "--root", str(data), "--out", out, *JOB_ARGS, *s3_endpoint.cli_options(), env=plain)
    logs = [p.communicate(timeout=300)[0] for p in (by_env, by_flags)]
    codes = sorted(p.returncode for p in (by_env, by_flags))
    assert codes == [0, 2], "\n-----\n".join(log[-3000:] for log in logs)
    refused = logs[[by_env.returncode, by_flags.returncode].index(2)]
    assert "cameo-corr preprocess: error:" in refused and "being written by another job" in refused, refused[-3000:]
    assert "Started a local Ray instance" not in refused  # refused before Ray starts

    verify = subprocess.run([sys.executable, "-m", "cameo_corr.cli", "cache", "verify", out, "--deep",
                             *s3_endpoint.cli_options()], env=plain, capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for key, value in s3_endpoint.env.items():  # the test process reads the bucket through the environment
        monkeypatch.setenv(key, value)
    from cameo_corr.cache.reader import CorrCache

    config = CorrCache(out).config
    assert_equals_reference(out, reference_of(data, config, 3, 2))
    assert "secret=***" in config.created_by["command"] or "--storage-option" not in config.created_by["command"]
    assert not CorrCache(out).location.exists("lease.json")


def test_storage_option_values_never_reach_the_recorded_command():
    from cameo_corr.cli.args import redact_storage_options

    client = {"endpoint_url": "http://minio:9000", "aws_secret_access_key": "s", "nested": [{"SessionToken": "t"}]}
    argv = ["--out", "s3://b/c", "--storage-option", "secret=abc", f"--storage-option=client_kwargs={json.dumps(client)}",
            "--storage-option", 'config_kwargs={"read_timeout": 5}', "--storage-option", "anon=false", "--grid", "8"]
    kept = {"endpoint_url": "http://minio:9000", "aws_secret_access_key": "***", "nested": [{"SessionToken": "***"}]}
    assert redact_storage_options(argv) == ["--out", "s3://b/c", "--storage-option", "secret=***",
                                            f"--storage-option=client_kwargs={json.dumps(kept)}", "--storage-option",
                                            'config_kwargs={"read_timeout": 5}', "--storage-option", "anon=false", "--grid", "8"]
    # argparse takes an unambiguous abbreviation of the flag: its values are redacted as well
    assert redact_storage_options(["--storage", "key=abc", "--storage-opt=token=xyz", "--split", "train"]) == [
        "--storage", "key=***", "--storage-opt=token=***", "--split", "train"]


def test_the_recorded_command_names_the_program_as_started(monkeypatch):
    """``created_by.command``: ``python -m cameo_corr.cli`` where the package ran as a module (not its
    ``__main__.py``), a script or console script by its name; storage option values redacted."""
    import sys
    import types

    from cameo_corr.cli.args import recorded_command

    module_main = types.ModuleType("__main__")
    module_main.__spec__ = types.SimpleNamespace(name="cameo_corr.cli.__main__")
    monkeypatch.setitem(sys.modules, "__main__", module_main)
    assert (recorded_command(["/x/cameo_corr/cli/__main__.py", "cache", "merge", "--storage-option", "secret=s"])
            == "python -m cameo_corr.cli cache merge --storage-option 'secret=***'")
    # quoted for a shell: a path with a space, a JSON value
    assert (recorded_command(["cameo-corr", "preprocess", "--root", "/data/my synth", '--storage-option=config_kwargs={"a": 1}'])
            == """cameo-corr preprocess --root '/data/my synth' '--storage-option=config_kwargs={"a": 1}'""")
    assert recorded_command(["/venv/bin/cameo-corr", "preprocess", "--out", "o"]) == "cameo-corr preprocess --out o"
    assert recorded_command(["jobs/preprocess.py", "--out", "o"]) == "preprocess.py --out o"


def test_a_file_replaced_while_it_is_read_is_read_whole(s3_endpoint):
    """``consolidated.json`` and ``lease.json`` are replaced while other processes read them: a read
    returns the old or the new bytes, never an error (a read that pins the ETag of a first request and
    fetches with ``If-Match`` is refused when the object is replaced in between)."""
    import threading
    import time

    import s3fs

    from cameo_corr.cache.location import CacheLocation

    url = f"{s3_endpoint.new_bucket()}/cache"
    versions = [b'{"renewed": %d}' % i + b" " * (i * 7) for i in range(2)]
    writer = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options)
    writer.pipe(f"{url}/lease.json", versions[0])
    location = CacheLocation(url, s3_endpoint.storage_options)
    stop, written = threading.Event(), [0]

    def replace() -> None:
        while not stop.is_set():
            written[0] += 1
            writer.pipe(f"{url}/lease.json", versions[written[0] % 2])

    thread = threading.Thread(target=replace, daemon=True)
    thread.start()
    try:
        # at least 4 s of racing, longer until both sides made enough requests (a loaded machine serves fewer)
        reads, start = 0, time.monotonic()
        while time.monotonic() < start + 4 or (min(reads, written[0]) <= 20 and time.monotonic() < start + 120):
            assert location.read_bytes("lease.json") in versions
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert reads > 20 and written[0] > 20
