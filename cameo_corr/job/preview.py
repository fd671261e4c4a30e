"""``preprocess --dry-run``: the whole plan without Ray and without writing anything.

Scenes, windows, failures by reason, what an existing cache already holds, what the run would compute
(``--max-windows``, ``--retry-failed``) and the bytes it would write, estimated from the shard format
(:meth:`~cameo_corr.schemas.CacheConfig.window_nbytes`: uncompressed) and, for an existing cache, from
its measured bytes per window. The start-up checks of a real run run first, so what a run would refuse
is refused here too.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping

from cameo_corr.job.config import JobConfig
from cameo_corr.job.plan import count_failures

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa


def plan_preview(config: JobConfig) -> dict[str, Any]:
    """``preprocess --dry-run``: the plan of ``config`` without Ray and without writing (the start-up
    checks run as for a real run, so what they refuse is refused here too).

    Keys: ``out``, ``dataset``, ``split``, ``plan`` (the sampling), ``scenes``, ``scenes_with_windows``,
    ``windows_planned``, ``windows_computable``, ``failed_planning`` (``{reason: count}``),
    ``failed_examples`` (``{reason: [[scene, error], ...]}``), ``cache`` (``None`` for a new cache,
    else ``{"ok", "failed", "config_replaced", "orphans", "shards_missing", "windows_missing"}``: its
    rows among the planned windows, whether its config would be replaced (a cache without an ok
    window), and what the start-up would repair: orphans deleted, shard files missing and the ok
    windows they held, which are redone), ``windows_to_do`` (planned windows without
    a manifest row, failed ones too with ``retry_failed``), ``windows_this_run`` (after
    ``max_windows``), ``windows_this_run_computable``, ``bytes_per_window_arrays`` (uncompressed arrays),
    ``bytes_per_window_measured`` (the existing cache's, else ``None``), ``bytes_estimated`` (of this
    run's computable windows, by the measured figure when there is one), ``retry_failed``, ``repair``.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from cameo_corr.cache.config import read_existing_config
    from cameo_corr.cache.manifest import find_orphans, id_array, read_manifest, sorted_member, stored_shard_ids
    from cameo_corr.datasets.planner import plan_table
    from cameo_corr.job.driver import check_before_start, check_out, provisional_config

    location = check_out(config)
    reader = config.open_reader()
    plan, view = config.plan_config(), config.view(reader)
    existing = read_existing_config(location)
    pinned = check_before_start(config, location, reader, view, existing)
    table = plan_table(reader, plan, pinned.fingerprint() if pinned is not None else {}, scene_ids=config.scenes)
    errors = table.column("error")
    failures: Counter[str] = Counter()
    examples: dict[str, list[tuple[str, str]]] = {}
    count_failures(table.column("scene_id").to_pylist(), errors.to_pylist(), failures, examples)
    computable = pc.is_null(errors)
    todo = table
    cache: dict[str, Any] | None = None
    measured = None
    if existing is not None:
        cache = {"ok": 0, "failed": 0, "config_replaced": pinned is None, "orphans": 0, "shards_missing": 0,
                 "windows_missing": 0}
        if pinned is not None:
            rows = read_manifest(location, columns=["window_id", "status", "shard", "shard_bytes"])
            measured = _measured_bytes_per_window(rows)  # also from shards whose file went missing
            # what the run's start-up repairs (read only here): orphans it deletes, shard files that are missing
            cache["orphans"] = len(find_orphans(location))
            present = pa.array(sorted(stored_shard_ids(location)), pa.string())
            lost = pc.and_(pc.equal(rows.column("status"), "ok"), pc.invert(pc.is_in(rows.column("shard"), value_set=present)))
            cache["shards_missing"] = pc.count_distinct(rows.filter(lost).column("shard")).as_py()
            rows = rows.filter(pc.invert(lost))  # their rows are dropped at start-up: the windows are redone
            planned_ids = id_array(table.column("window_id"))  # binary search of sorted ids, as a run's DoneWindows
            mine = rows.filter(pa.array(sorted_member(id_array(rows.column("window_id")), np.sort(planned_ids))))
            status = mine.column("status")
            cache["ok"] = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
            cache["failed"] = mine.num_rows - cache["ok"]
            cache["windows_missing"] = int(pc.sum(lost).as_py() or 0)
            redo = mine if not config.retry_failed else mine.filter(pc.equal(status, "ok"))
            todo = table.filter(pa.array(~sorted_member(planned_ids, np.sort(id_array(redo.column("window_id"))))))
    this_run = todo if config.max_windows is None else todo.slice(0, config.max_windows)
    n_compute = int(pc.sum(pc.is_null(this_run.column("error"))).as_py() or 0)
    arrays = provisional_config(config, reader, view).window_nbytes()
    return {
        "out": config.out,
        "dataset": reader.tag,
        "split": reader.split,
        "plan": plan.to_dict(),
        "scenes": pc.count_distinct(table.column("scene_id")).as_py() if table.num_rows else 0,
        "scenes_with_windows": pc.count_distinct(table.filter(computable).column("scene_id")).as_py() if table.num_rows else 0,
        "windows_planned": table.num_rows,
        "windows_computable": int(pc.sum(computable).as_py() or 0),
        "failed_planning": dict(failures.most_common()),
        "failed_examples": {k: [list(e) for e in v] for k, v in examples.items()},
        "cache": cache,
        "windows_to_do": todo.num_rows,
        "windows_this_run": this_run.num_rows,
        "windows_this_run_computable": n_compute,
        "bytes_per_window_arrays": arrays,
        "bytes_per_window_measured": measured,
        "bytes_estimated": int(round(n_compute * (measured if measured is not None else arrays))),
        "retry_failed": config.retry_failed,
        "repair": config.repair,
    }


def _measured_bytes_per_window(rows: "pa.Table") -> float | None:
    """Shard bytes per ok window of a cache's manifest rows (``None`` without ok rows or recorded sizes)."""
    import pyarrow.compute as pc

    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    if not ok.num_rows or ok.column("shard_bytes").null_count:
        return None
    per_shard = ok.group_by("shard").aggregate([("shard_bytes", "max")])
    return float(pc.sum(per_shard.column("shard_bytes_max")).as_py()) / ok.num_rows


def format_plan(preview: Mapping[str, Any]) -> str:
    """Human-readable :func:`plan_preview`."""
    p = preview["plan"]
    sampling = f"{p['policy']} sampling" + (f", span {p['span_per_view'][0]:g}-{p['span_per_view'][1]:g} raw frames per view"
                                           if p["policy"] == "stride" else "")
    lines = [
        f"plan of {preview['out']} (dry run: nothing computed or written)",
        f"dataset: {preview['dataset']} split {preview['split']}: {preview['scenes']} scenes, "
        f"{preview['scenes_with_windows']} of them give windows (S={p['views']}, K={p['windows_per_scene']}, {sampling}, seed {p['seed']})",
        f"windows: planned {preview['windows_planned']}, computable {preview['windows_computable']}, "
        f"failed at planning {preview['windows_planned'] - preview['windows_computable']}",
    ]
    for reason, n in preview["failed_planning"].items():
        sid, error = preview["failed_examples"][reason][0]
        lines.append(f"  failed: {n} x {reason} (e.g. scene {sid!r}: {error})")
    cache = preview["cache"]
    if cache is None:
        lines.append("cache: new")
    elif cache["config_replaced"]:
        lines.append("cache: has no ok window and another config: its failed rows and cache.json would be replaced")
    else:
        redo = "" if not cache["failed"] else " (redone: --retry-failed)" if preview["retry_failed"] else " (pass --retry-failed to redo them)"
        lines.append(f"cache: {cache['ok']} of the planned windows ok, {cache['failed']} failed{redo}")
        if cache["shards_missing"]:
            lines.append(f"  {cache['shards_missing']} shard file(s) missing: their {cache['windows_missing']} ok window(s) are redone")
        if cache["orphans"]:
            lines.append(f"  {cache['orphans']} orphan(s) of killed writers (temporary files, shards without rows) are deleted at start-up")
        if preview["repair"]:
            lines.append("  --repair: every chunk is decoded at start-up and the windows of corrupt shards are redone "
                         "(not checked by a dry run; `cameo-corr cache verify --deep` lists them)")
    limited = preview["windows_this_run"] < preview["windows_to_do"]
    lines.append(f"this run: {preview['windows_this_run']} of {preview['windows_to_do']} windows to do"
                 + (" (--max-windows)" if limited else "") + f", {preview['windows_this_run_computable']} to compute")
    measured = preview["bytes_per_window_measured"]
    lines.append(f"bytes: about {preview['bytes_estimated']:,} for this run ("
                 + (f"{measured:,.0f} per window measured in this cache; " if measured is not None else "")
                 + f"{preview['bytes_per_window_arrays']:,} per window of uncompressed arrays)")
    return "\n".join(lines)


__all__ = ["plan_preview", "format_plan"]
