"""One rank of ``test_train_loop.test_the_train_command_runs_on_two_processes``: the ``cameo-corr`` command
as ``accelerate launch -m cameo_corr.cli`` runs it, plus a record of how the process ended.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_cli_rank.py OUT cameo-corr-args...``.
At interpreter exit each rank writes ``OUT/exit-rank<r>.json``: whether the default process group was
still up (it must have been destroyed by then, see ``end_process_group``).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from cameo_corr.cli import main


def _record(out: Path) -> None:
    rank = os.environ["RANK"]
    (out / f"exit-rank{rank}.json").write_text(json.dumps({"process_group_up": dist.is_initialized()}))


if __name__ == "__main__":
    atexit.register(_record, Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
