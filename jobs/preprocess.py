"""Entry point of the preprocessing job for ``ray job submit`` (same arguments as ``cameo-corr preprocess``).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/preprocess.py --dataset re10k --root /data/re10k --out s3://bucket/cache ...

The job's driver runs this file from the uploaded working directory; the package next to it is put
first on ``sys.path`` so the submitted code (not an older installed copy) runs on the driver, and Ray
ships the same working directory to every worker.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cameo_corr.pipeline.ray_job import add_preprocess_arguments, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the ``cameo-corr preprocess`` arguments and run the job; returns the exit code."""
    parser = argparse.ArgumentParser(prog="jobs/preprocess.py", description=__doc__.split("\n\n")[0])
    add_preprocess_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
