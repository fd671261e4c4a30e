"""Entry point of the preprocessing job for ``ray job submit`` (same arguments as ``cameo-corr preprocess``).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/preprocess.py --dataset re10k --root /data/re10k --out s3://bucket/cache ...

The job's driver runs this file from the uploaded working directory; the package next to it is put
first on ``sys.path`` so the submitted code (not an older installed copy) runs on the driver, and Ray
ships the same working directory to every worker. Errors and exit codes are those of the
``cameo-corr`` command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cameo_corr.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run ``cameo-corr preprocess`` with ``argv`` (default: this process's arguments); returns the exit code."""
    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
