"""The preprocessing job: dataset -> windows -> pointmaps -> correspondences -> cache, on Ray Data.

* :mod:`.config`: :class:`JobConfig`, the job's one frozen configuration, validated on construction;
* :mod:`.stages`: the pipeline's stages (source, load, geometry, commit), each a named unit;
* :mod:`.driver`: :func:`run_job`, which reads as the pipeline (lease, Ray, upkeep, plan, stages, summary);
* :mod:`.plan`: the check before Ray starts that the plan has a window to compute; :mod:`.preview`: ``--dry-run``;
* :mod:`.cli`: ``cameo-corr preprocess`` (``jobs/preprocess.py`` runs it under ``ray job submit``).

Local Ray by default; a cluster when ``RAY_ADDRESS`` is set or under ``ray job submit``.
"""

from cameo_corr.job.config import JobConfig
from cameo_corr.job.driver import run_job, run_preprocess

__all__ = ["JobConfig", "run_job", "run_preprocess"]
