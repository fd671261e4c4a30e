"""Who holds a cache's lease, and whether that holder is provably gone.

A lease records its holder as people read it (``user@host pid N (ray job J)``) and as a new job can
check it: the host name, the pid and the process's start time (Linux: ``/proc/<pid>/stat``, in clock
ticks since boot), a *machine* id (the kernel's boot id and the pid namespace, so that two containers
sharing a host name are never confused), the Ray job's submission id and the Ray cluster address the
holder ran under (``RAY_ADDRESS``).

:func:`holder_gone` says why a holder is gone, or ``None`` when that cannot be proven:

* on the same machine (same host name and machine id): its pid no longer exists, is a zombie, or now
  belongs to a process started at another time (pid reuse);
* on another machine of the same Ray cluster (the holder's ``RAY_ADDRESS`` is ours): Ray's job API
  reports its job in a terminal state (``SUCCEEDED``, ``FAILED``, ``STOPPED``). A job Ray does not
  know, an unreachable cluster or a query that takes longer than :data:`RAY_QUERY_SECONDS` prove
  nothing: the lease's timeout applies as before.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
from typing import Any

logger = logging.getLogger(__name__)

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""The variable in which ``ray job submit`` hands its driver the job's config (metadata: the submission id)."""
RAY_QUERY_SECONDS = 15.0
"""The longest wait for Ray's answer about another job's status."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first); ``None`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); ``None`` elsewhere or when it does not exist."""
    if not os.path.isdir("/proc"):
        return None
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def machine_id() -> str | None:
    """``<boot id>/<pid namespace>`` (Linux), telling this kernel and pid namespace from any other; else ``None``."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def ray_submission_id() -> str | None:
    """The submission id of the Ray job this process is the driver of (``ray job submit``), else ``None``."""
    try:
        metadata = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("metadata") or {}
    except ValueError:
        return None
    job = metadata.get("job_submission_id") if isinstance(metadata, dict) else None
    return str(job) if job else os.environ.get("RAY_JOB_SUBMISSION_ID") or None


def this_holder() -> dict[str, Any]:
    """The lease fields naming this process (``holder`` for people, the rest for :func:`holder_gone`)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    host, pid, job = socket.gethostname(), os.getpid(), ray_submission_id()
    text = f"{user}@{host} pid {pid}" + (f" (ray job {job})" if job else "")
    return {"holder": text, "host": host, "pid": pid, "process_start": process_start(pid), "machine": machine_id(),
            "ray_job": job, "ray_address": os.environ.get("RAY_ADDRESS") or None}


def describe_holder() -> str:
    """``user@host pid N`` plus the Ray job's submission id when running under ``ray job submit``."""
    return str(this_holder()["holder"])


def _on_this_machine(record: dict[str, Any]) -> bool:
    """Whether the holder ran on this machine (same host name, kernel boot and pid namespace)."""
    mine = machine_id()
    return mine is not None and record.get("machine") == mine and record.get("host") == socket.gethostname()


def _process_gone(record: dict[str, Any]) -> str | None:
    """Why the holder's process (on this machine) is gone; ``None`` while it runs."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    fields = _proc_stat(pid)
    if fields is None:
        return f"its process {pid} on {record['host']} has exited"
    if fields[0] == "Z":
        return f"its process {pid} on {record['host']} has exited (a zombie)"
    started = record.get("process_start")
    if started is not None and len(fields) > 19 and int(fields[19]) != int(started):
        return f"its process {pid} on {record['host']} has exited (the pid now belongs to another process)"
    return None


def _ray_job_gone(record: dict[str, Any], timeout: float) -> str | None:
    """Why the holder's Ray job is over, asked of our own cluster when it is the holder's; else ``None``."""
    job, address = record.get("ray_job"), record.get("ray_address")
    if not job or not address or os.environ.get("RAY_ADDRESS") != address:
        return None
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            from ray.job_submission import JobSubmissionClient

            answer["status"] = JobSubmissionClient(address).get_job_status(job)
        except Exception as e:  # noqa: BLE001 - no answer proves nothing; the timeout applies
            answer["error"] = e

    thread = threading.Thread(target=ask, daemon=True, name="cameo-lease-ray-query")
    thread.start()
    thread.join(timeout)
    status = answer.get("status")
    if status is None:
        logger.info("could not ask Ray about the lease holder's job %s (%s); its lease times out as usual", job,
                    answer.get("error", f"no answer in {timeout:g} s"))
        return None
    return f"its Ray job {job} is {status.value}" if status.is_terminal() else None


def holder_gone(record: dict[str, Any], *, ray_timeout: float = RAY_QUERY_SECONDS) -> str | None:
    """Why the holder of ``record`` is provably gone (its process exited, its Ray job ended), else ``None``."""
    if _on_this_machine(record):
        return _process_gone(record)
    return _ray_job_gone(record, ray_timeout)


__all__ = [
    "RAY_JOB_CONFIG_ENV",
    "RAY_QUERY_SECONDS",
    "describe_holder",
    "holder_gone",
    "machine_id",
    "process_start",
    "ray_submission_id",
    "this_holder",
]
