"""The cluster recipe of ``jobs/README.md`` on a real multi-node Ray cluster on this machine.

A head and two worker nodes (``ray start``, 1 CPU each, free ports only, token authentication on with
a token of the test's own), the job sent with ``ray job submit`` exactly as the README says; one
worker node's raylet is SIGKILLed mid-run and the job must still end with rc 0 and a cache equal to
the pipeline functions called directly; a second job submitted at the same time on the same cache
is refused. Then, on the two nodes left (2 nodes x 1 CPU), a job with two model actors must finish
(the deadlock case). Every process the test started is killed by PID.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


class LocalCluster:
    """Processes of a `ray start` cluster, found by its private temp dir (and their children)."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="rc")
        token = Path(self.temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        self.env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.worker_manager_ports: list[int] = []

    def start(self) -> None:
        ray = ray_cli()
        common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(150 * 2**20)]
        head = [ray, "start", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                "--temp-dir", self.temp, *common, *node_ports()]
        subprocess.run(head, env=self.env, check=True, capture_output=True, timeout=180)
        for _ in range(2):
            ports = node_ports()
            self.worker_manager_ports.append(int(ports[1]))
            subprocess.run([ray, "start", "--address", f"127.0.0.1:{self.gcs_port}", *common, *ports],
                           env=self.env, check=True, capture_output=True, timeout=180)

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(self.temp in part for part in (p.info["cmdline"] or [])):
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
        shutil.rmtree(self.temp, ignore_errors=True)

    def submit(self, out: Path, root: Path, *extra: str) -> subprocess.Popen:
        """The README's command: from the repository root, RAY_ADDRESS = the dashboard."""
        env = {**self.env, "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}"}
        cmd = [ray_cli(), "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--",
               "python", "jobs/preprocess.py", "--root", str(root), "--out", str(out), *JOB_ARGS, *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from cameo_corr.datasets.synthetic import generate_dataset

    return Path(generate_dataset(tmp_path_factory.mktemp("data") / "synth", scenes=5, frames=8, image_size=48, seed=1))


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the job did not finish in {timeout} s:\n{out[-3000:]}")
    return out


def test_concurrent_job_refused_node_loss_survived_two_nodes_of_one_cpu_finish(cluster, data, tmp_path, reference_of, assert_equals_reference):
    # 1. a second job on a cache that a running job holds is refused, naming the holder. The second
    # job is submitted once the first holds its lease: two submissions of one working directory at the
    # same instant race inside Ray's package extraction (one driver can lose its cwd), which is Ray's
    # business, not the lease's.
    out = tmp_path / "cache"
    job = cluster.submit(out, data, "--workers", "2")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None and not (out / "lease.json").exists():
        time.sleep(0.05)
    assert job.poll() is None and (out / "lease.json").exists(), f"the first job never took its lease:\n{job.stdout.read()[-3000:]}"
    refused = [cluster.submit(out, data, "--workers", "2")]
    refused_log = finish(refused[0], 30)
    assert refused[0].returncode != 0 and "cameo-corr preprocess: error:" in refused_log, refused_log[-3000:]
    assert "being written by another job" in refused_log and "pass --force" in refused_log, refused_log[-3000:]
    # 2. a worker node's raylet is killed mid-run: the job itself completes, rc 0, cache == reference
    while time.monotonic() < deadline and job.poll() is None and not fragment_names(CacheLocation(out)):
        time.sleep(0.05)
    assert job.poll() is None, f"the job ended before a node could be killed:\n{job.stdout.read()[-3000:]}"
    cluster.raylet_of(cluster.worker_manager_ports[0]).send_signal(signal.SIGKILL)
    log = finish(job, 300)
    assert job.returncode == 0, log[-4000:]
    # Ray prints the lost node's last raylet log lines and "marked dead" to the driver; one note says what they mean
    if "has been marked dead" in log:
        assert log.count("cameo-corr preprocess: note: the Ray node ") == 1, log[-4000:]
    assert log.count("cameo-corr preprocess: note: Ray's core worker logs at error level") == 1, log[-4000:]
    cache = CorrCache(out)
    reference = reference_of(data, cache.config, 3, 2)
    assert f"windows: planned {len(reference)}, already done 0, ok {len(reference)}, failed 0" in log, log[-4000:]
    assert verify_cache(cache) == []
    assert_equals_reference(out, reference)

    # 3. the two nodes left have one CPU each; two model actors must not starve the load/commit tasks
    out2 = tmp_path / "cache2"
    job = cluster.submit(out2, data, "--workers", "2")
    log = finish(job, 300)
    assert job.returncode == 0, log[-4000:]
    assert_equals_reference(out2, reference_of(data, CorrCache(out2).config, 3, 2))
