"""The cluster recipe of ``jobs/README.md`` on a real multi-node Ray cluster on this machine, writing
its cache to a real S3 endpoint.

A head and two worker nodes (``ray start``, 1 CPU each, free ports only, token authentication on with
a token of the test's own), each node with its own ``--temp-dir`` and ``TMPDIR`` and the bucket's
endpoint in its ``AWS_*`` environment: the nodes share no path but the bucket (and the dataset root,
which the job reads on every node, as on a real cluster's shared mount). The job is sent with ``ray job
submit`` exactly as the README says, with ``--out s3://...``; a second job started as another driver
while the first holds the lease is refused before it starts Ray; one worker node's raylet is SIGKILLed
mid-run and the job must still end with rc 0, ``verify --deep`` clean and arrays equal to the pipeline
functions called directly. Then, on the two nodes left (2 nodes x 1 CPU), a job with two model actors
must finish (the deadlock case), taking over at once a lease whose holder's Ray job has ended. Every
process the test started is killed by PID.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

from cameo_corr.cache.location import CacheLocation  # noqa: E402
from cameo_corr.cache.manifest import fragment_names
from cameo_corr.cache.reader import CorrCache
from cameo_corr.cache.verify import verify_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB_ARGS = ["--dataset", "synthetic", "--backend", "depth", "--grid", "8", "--views", "3", "--windows-per-scene", "2",
            "--crop-size", "48", "--shard-size", "1", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Free ports for every listening service of one node (no Ray default port is used)."""
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port"]
    return [x for f in flags for x in (f, str(free_port()))]


def ray_cli() -> str:
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if exe is None:
        pytest.skip("the `ray` command is not installed (pip install -e '.[cluster]')")
    return exe


def run_node(cmd: list[str], env: dict[str, str]) -> None:
    """``ray start ...``; a failure shows Ray's own output."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


class LocalCluster:
    """Processes of a `ray start` cluster, found by its private base dir (each node's temp dir is under it)."""

    def __init__(self, node_env: dict[str, str]) -> None:
        self.base = tempfile.mkdtemp(prefix="rc")
        token = Path(self.base) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                         **node_env})
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.worker_manager_ports: list[int] = []

    def node_dirs(self, name: str) -> tuple[list[str], dict[str, str]]:
        """``--temp-dir`` of node ``name`` and its environment with its own ``TMPDIR`` (nothing shared)."""
        temp = Path(self.base) / name
        (temp / "tmp").mkdir(parents=True)
        return ["--temp-dir", str(temp)], {**self.env, "TMPDIR": str(temp / "tmp")}

    def start(self) -> None:
        ray = ray_cli()
        common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(150 * 2**20)]
        temp, env = self.node_dirs("h")
        head = [ray, "start", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                *temp, *common, *node_ports()]
        run_node(head, env)
        for i in range(2):
            ports = node_ports()
            self.worker_manager_ports.append(int(ports[1]))
            temp, env = self.node_dirs(f"w{i}")
            run_node([ray, "start", "--address", f"127.0.0.1:{self.gcs_port}", *temp, *common, *ports], env)

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.base in part for part in (p.info["cmdline"] or [])):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def raylet_of(self, node_manager_port: int) -> psutil.Process:
        for p in self.processes():
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if cmd and cmd[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in cmd:
                return p
        raise AssertionError(f"no raylet with node manager port {node_manager_port}")

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)
        shutil.rmtree(self.base, ignore_errors=True)

    def submit(self, out: str, root: Path, *extra: str) -> Job:
        """The README's command: from the repository root, RAY_ADDRESS = the dashboard."""
        env = {**self.env, "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}"}
        cmd = [ray_cli(), "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
               "python", "jobs/preprocess.py", "--root", str(root), "--out", out, *JOB_ARGS, *extra]
        return Job("ray job submit", subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True))

    def driver(self, out: str, root: Path, *extra: str) -> Job:
        """A second driver of the cluster started from this machine (no `ray job submit`, no working-dir package)."""
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        cmd = [sys.executable, "jobs/preprocess.py", "--root", str(root), "--out", out, *JOB_ARGS, *extra]
        return Job("driver", subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


class Job:
    """A job's client process and its output, read as it comes (a failure can be shown at any point)."""

    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name, self.proc, self.lines = name, proc, []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    def log(self, last: int = 4000) -> str:
        return "".join(self.lines)[-last:]

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float) -> str:
        """The whole output once the process ended; kills it after ``timeout`` s (an AssertionError with its log)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(10)
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{self.log()}") from None
        self.reader.join(10)
        return "".join(self.lines)

    def submission_id(self) -> str:
        found = re.search(r"Job '(raysubmit_\w+)' submitted successfully", "".join(self.lines))
        assert found, self.log()
        return found.group(1)


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    c = LocalCluster(s3_endpoint.env)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cameo_corr.datasets.synthetic import generate_dataset

    return Path(generate_dataset(tmp_path_factory.mktemp("data") / "synth", scenes=5, frames=8, image_size=48, seed=1))


def phase(what: str, since: list[float]) -> None:
    """Print how long the test's phase ``what`` took (pytest shows it with a failure: where a slow CI spent its time)."""
    now = time.monotonic()
    print(f"[cluster test] {what}: {now - since[0]:.1f} s", flush=True)
    since[0] = now


def wait_for(condition, job: Job, what: str, timeout: float = 240) -> None:
    """Poll ``condition`` while ``job`` runs; its death or a timeout fail the test as *its* failure, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.running() and not condition():
        time.sleep(0.1)
    assert job.running() and condition(), (f"{job.name} (rc {job.proc.poll()}) ended or stalled before {what}:\n{job.log()}")


def test_concurrent_job_refused_node_loss_survived_two_nodes_of_one_cpu_finish(
        cluster, data, s3_endpoint, monkeypatch, reference_of, assert_equals_reference):
    for key, value in s3_endpoint.env.items():  # this process reads the bucket as the nodes do: AWS_* variables
        monkeypatch.setenv(key, value)
    clock = [time.monotonic()]
    assert all(any((Path(cluster.base) / node).glob("session_*")) for node in ("h", "w0", "w1"))  # a Ray dir per node
    bucket = s3_endpoint.new_bucket()
    out = f"{bucket}/caches/synth"
    location = CacheLocation(out)
    # 1. a second job on a cache that a running job holds is refused, naming the holder, before it starts
    # Ray: it runs as a second driver, so that it depends on nothing of Ray's (no working-dir package)
    job = cluster.submit(out, data, "--workers", "2")
    wait_for(lambda: location.exists("lease.json"), job, "taking the cache's lease")
    holder = json.loads(location.read_bytes("lease.json"))
    phase("job 1 submitted, holds the lease", clock)
    refused = cluster.driver(out, data, "--workers", "2")
    refused_log = refused.finish(60)
    assert job.running(), f"the first job ended while the second was refused:\n{job.log()}\n----- second:\n{refused_log[-3000:]}"
    assert refused.proc.returncode == 2 and "cameo-corr preprocess: error:" in refused_log, refused_log[-3000:]
    assert "being written by another job" in refused_log and holder["holder"] in refused_log, refused_log[-3000:]
    assert "pass --force" in refused_log and "Connected to Ray cluster" not in refused_log, refused_log[-3000:]
    phase("job 2 refused", clock)
    # 2. a worker node's raylet is killed mid-run: the job itself completes, rc 0, cache == reference
    wait_for(lambda: bool(fragment_names(location)), job, "its first shard")
    cluster.raylet_of(cluster.worker_manager_ports[0]).send_signal(signal.SIGKILL)
    phase("job 1's first shard, a worker node killed", clock)
    log = job.finish(300)
    phase("job 1 finished", clock)
    assert job.proc.returncode == 0, log[-4000:]
    # Ray prints a lost node's last raylet log lines and "marked dead" to the driver; one note per node it
    # marked dead says what they mean (no note for a node Ray did not mark dead)
    dead = set(re.findall(r"The node with node id: ([0-9a-f]{12})[0-9a-f]* .*? has been marked dead", log))
    notes = re.findall(r"cameo-corr preprocess: note: the Ray node ([0-9a-f]{12}) ", log)
    assert len(notes) == len(set(notes)) and (set(notes) == dead if dead else len(notes) <= 1), log[-4000:]
    assert log.count("cameo-corr preprocess: note: Ray's core worker logs at error level") == 1, log[-4000:]
    cache = CorrCache(out)
    reference = reference_of(data, cache.config, 3, 2)
    assert f"windows: planned {len(reference)}, already done 0, ok {len(reference)}, failed 0" in log, log[-4000:]
    assert verify_cache(cache, deep=True) == []
    assert_equals_reference(out, reference)
    assert not location.exists("lease.json")
    phase("job 1's cache verified (deep) and compared", clock)

    # 3. the two nodes left have one CPU each; two model actors must not starve the load/commit tasks. The
    # cache holds a live lease of a driver on another machine whose Ray job (the first one) has ended: it
    # is taken over at once
    out2 = f"{bucket}/caches/synth2"
    first = job.submission_id()
    ended = {**holder, "holder": f"someone@another-node pid 4242 (ray job {first})", "host": "another-node", "pid": 4242,
             "machine": "another-boot/pid:[1]", "ray_job": first, "token": "ended", "renewed": time.time(), "timeout": 3600}
    CacheLocation(out2).write_bytes_atomic("lease.json", json.dumps(ended).encode())
    job = cluster.submit(out2, data, "--workers", "2", "--max-windows", "4")  # two actors busy: enough windows
    log = job.finish(300)
    phase("job 3 finished", clock)
    assert job.proc.returncode == 0, log[-4000:]
    assert f"taking over the cache lease of {ended['holder']}" in log and f"its Ray job {first} is SUCCEEDED" in log, log[-4000:]
    assert_windows_equal_reference(CorrCache(out2), reference, 4)


def assert_windows_equal_reference(cache: CorrCache, reference: dict, rows: int) -> None:
    """The cache holds ``rows`` windows of the plan, each ok one with the reference's arrays."""
    import numpy as np

    ids = cache.manifest(None).column("window_id").to_pylist()
    assert len(ids) == rows and set(ids) <= set(reference)
    assert sorted(cache.window_ids()) == sorted(w for w in ids if reference[w] is not None)
    for wid in cache.window_ids():
        got = cache.window(wid)
        assert set(got) == set(reference[wid]) and all(np.array_equal(got[k], v, equal_nan=True) for k, v in reference[wid].items())
