"""The job's plan before Ray starts: the check that the plan has a window to compute.

:func:`check_plan` is part of the driver's start-up checks
(:func:`~cameo_corr.job.driver.check_before_start`): it plans scene batches until one gives a window
that can be computed, so a healthy dataset costs one small batch of planning, and a plan in which no
scene can give a window (``--views`` above every scene's frame count, a ``--scene`` that does not
exist, a reader option under which no scene reads) is refused with exit 2 before Ray starts.

:func:`plan_preview` is ``preprocess --dry-run``: the whole plan without Ray and without writing
anything: scenes, windows, failures by reason, what an existing cache already holds, what the run
would compute (``--max-windows``) and the bytes it would write, estimated from the shard format
(:meth:`~cameo_corr.schemas.CacheConfig.window_nbytes`) and, for an existing cache, from its measured
bytes per window.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Mapping

from cameo_corr.cli.errors import UsageError
from cameo_corr.job.config import JobConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.datasets.base import SceneReader
    from cameo_corr.datasets.planner import PlanConfig

EXAMPLES_PER_REASON = 3
"""Scenes named per failure reason in the error of a plan without any window."""


def check_scenes(config: JobConfig, reader: "SceneReader") -> None:
    """Refuse ``--scene`` ids the dataset does not have (:class:`UsageError` listing a few it has)."""
    if config.scenes is None:
        return
    known = set(reader.scene_ids())
    unknown = [s for s in config.scenes if s not in known]
    if unknown:
        some = ", ".join(sorted(known)[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
        raise UsageError(f"--scene {unknown[0]}: no such scene in dataset {reader.name!r} (split {reader.split!r}); "
                         f"it has {some or 'no scene'}", where=str(reader.root))


def check_plan(config: JobConfig, reader: "SceneReader", plan: "PlanConfig") -> None:
    """Refuse a plan in which no scene gives a window to compute (:class:`UsageError`, exit 2), naming
    scenes and reasons. Scenes are planned a batch at a time and the check stops at the first batch
    holding a computable window (window ids do not matter here, so no backend is needed)."""
    from cameo_corr.datasets.planner import READ_BATCH, iter_plan_batches

    check_scenes(config, reader)
    failures: Counter[str] = Counter()
    examples: dict[str, list[tuple[str, str]]] = {}
    for batch in iter_plan_batches(reader, plan, {}, scene_ids=config.scenes, scenes_per_batch=READ_BATCH):
        if batch.column("error").null_count:
            return
        count_failures(batch.column("scene_id").to_pylist(), batch.column("error").to_pylist(), failures, examples)
    total = sum(failures.values())
    if not total:
        raise UsageError(f"dataset {reader.name!r} (split {reader.split!r}) has no scene", where=str(reader.root))
    detail = "; ".join(f"{n} x {reason}: " + ", ".join(f"scene {sid!r}: {err}" for sid, err in examples[reason])
                       for reason, n in failures.most_common())
    raise UsageError(f"no window to compute: every one of the {total} planned scene(s) fails planning ({detail})"
                     + _hint(failures, plan), where=str(reader.root))


def count_failures(scene_ids: list[str], errors: list[str | None], failures: Counter[str],
                    examples: dict[str, list[tuple[str, str]]]) -> None:
    """Add the failed rows among ``errors`` (planned windows' errors, ``None`` for computable ones) to
    ``failures`` (by :func:`~cameo_corr.datasets.planner.failure_reason`) and keep a few examples per
    reason in ``examples``."""
    from cameo_corr.datasets.planner import failure_reason

    for sid, error in zip(scene_ids, errors):
        if error is None:
            continue
        reason = failure_reason(error)
        failures[reason] += 1
        if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
            examples[reason].append((sid, error))


def _hint(failures: Mapping[str, int], plan: "PlanConfig") -> str:
    """What to change when every scene failed for one reason the command line controls."""
    from cameo_corr.datasets.planner import TOO_SHORT

    if set(failures) == {TOO_SHORT}:
        return f"; lower --views (now {plan.views})"
    return ""


__all__ = ["EXAMPLES_PER_REASON", "check_scenes", "check_plan", "count_failures"]
