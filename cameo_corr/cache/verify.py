"""``cameo-corr cache verify``: is the cache what the contract says?

Every ok manifest row has its shard row (the shard's ``window_ids`` attribute agrees), every shard row
is referenced once, shapes and dtypes match the schema
(:func:`~cameo_corr.schemas.validate_window_arrays`), ``nn`` diagonal is the identity, masks are
consistent with ``nn`` (``mask_ij[x]`` exactly when ``x`` is valid, view j has a valid token and the
cycle ``nn_ji[nn_ij[x]]`` lands within ``tau`` tokens of ``x``), ``nn`` only points at valid tokens,
and the manifest's ``valid_frac``/``mask_frac`` match the arrays (of the primary grid); every grid of
a multi-grid cache is checked (``--grid`` picks some); chunks failing their checksum are listed by
window. Streams shard by shard (``--max-windows`` reads only what it checks); ``--deep`` decodes every
chunk of every shard. :func:`repair_corrupt_shards` drops the shards holding corrupt windows so that
``preprocess --repair`` recomputes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from cameo_corr.cache.consolidation import drop_shards
from cameo_corr.cache.manifest import StringCodes, id_array, read_manifest, scan_manifest
from cameo_corr.cache.select import selected_manifest
from cameo_corr.cache.shard import CorruptCacheError, window_fractions
from cameo_corr.schemas import CACHE_ARRAYS, CameoCorrError, token_coords, validate_window_arrays

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pyarrow as pa

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.select import WindowSelection
    from cameo_corr.cache.shard import CorruptCacheError


def check_window_consistency(arrays: dict[str, np.ndarray], tau: float, grid: tuple[int, int]) -> list[str]:
    """Problems of one window's arrays beyond dtypes/shapes: diagonal, nn targets, cycle masks."""
    problems = []
    h, w = grid
    hw = h * w
    valid = np.asarray(arrays["valid"]).reshape(-1, hw)
    nn = np.asarray(arrays["nn"]).astype(np.int64)
    mask = np.asarray(arrays["mask"])
    dist = np.asarray(arrays["dist"])
    S = valid.shape[0]
    ident = np.arange(hw)
    xy = token_coords(grid)
    for i in range(S):
        if not np.array_equal(nn[i, i], ident):
            problems.append(f"nn[{i},{i}] is not the identity")
        if not np.array_equal(mask[i, i], valid[i]):
            problems.append(f"mask[{i},{i}] differs from valid[{i}]")
        if np.any(dist[i, i] != 0):
            problems.append(f"dist[{i},{i}] is not 0")
    for i in range(S):
        for j in range(S):
            if i == j:
                continue
            queries = valid[i] & valid[j].any()
            bad_target = queries & ~valid[j][nn[i, j]]
            if bad_target.any():
                problems.append(f"nn[{i},{j}] points at invalid tokens of view {j} for {int(bad_target.sum())} queries")
            cycle = nn[j, i][nn[i, j]]
            d2 = ((xy - xy[cycle]) ** 2).sum(-1)
            expected = queries & (d2 <= tau * tau + 1e-9)
            wrong = expected != mask[i, j]
            if wrong.any():
                problems.append(
                    f"mask[{i},{j}] disagrees with the cycle test (|p(x) - p(nn_ji[nn_ij[x]])| <= {tau}) "
                    f"at {int(wrong.sum())} tokens"
                )
    return problems


@dataclass
class VerifyReport:
    """What :func:`verify_report` found: ``problems`` (empty: consistent), how many ok windows were
    checked of ``windows_ok``, and ``corrupt`` (windows whose chunks fail their checksum or decoding,
    as ``(window id or None for a whole shard, shard id, array or None)``)."""

    problems: list[str] = field(default_factory=list)
    checked: int = 0
    windows_ok: int = 0
    corrupt: list[tuple[str | None, str, str | None]] = field(default_factory=list)


def _light_columns(batches: Iterable["pa.RecordBatch"]) -> dict[str, Any]:
    """The ``window_id``, ``status``, ``shard``, ``row``, ``error`` columns of all rows as numpy, batch by
    batch: ids (``S<n>``), status and shard codes (:class:`StringCodes`), null and empty masks."""
    import pyarrow.compute as pc

    def mask(arr: Any) -> np.ndarray:
        return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)

    ids, status, shard = [], StringCodes(), StringCodes()
    masks: dict[str, list[np.ndarray]] = {"shard_null": [], "row_null": [], "error_null": [], "error_empty": []}
    for batch in batches:
        ids.append(id_array(batch.column("window_id")))
        status.add(batch.column("status"))
        shard.add(batch.column("shard"))
        error = batch.column("error")
        masks["shard_null"].append(mask(batch.column("shard").is_null()))
        masks["row_null"].append(mask(batch.column("row").is_null()))
        masks["error_null"].append(mask(error.is_null()))
        masks["error_empty"].append(mask(pc.equal(error.fill_null(""), "")))
    out = {k: np.concatenate(v) if v else np.zeros(0, bool) for k, v in masks.items()}
    out["ids"] = np.concatenate(ids) if ids else np.zeros(0, "S1")
    out["status"], out["statuses"] = status.result()
    out["shard"], out["shards"] = shard.result()
    return out


def _schema(columns: Sequence[str]) -> "pa.Schema":
    import pyarrow as pa

    from cameo_corr.schemas import manifest_schema

    return pa.schema([manifest_schema().field(c) for c in columns])


def _manifest_problems(cols: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """Row-level manifest problems (vectorised over all rows of :func:`_light_columns`) and the mask of
    well-formed ok rows."""
    ids, statuses = cols["ids"], cols["statuses"]
    problems: list[str] = []
    srt = ids if len(ids) < 2 or bool(np.all(ids[1:] >= ids[:-1])) else np.sort(ids)  # one consolidated part: sorted
    dup = np.unique(srt[1:][srt[1:] == srt[:-1]]) if len(srt) > 1 else srt[:0]
    del srt
    problems += [f"window {w.decode()}: {int((ids == w).sum())} manifest rows" for w in dup]
    code = {name: k for k, name in enumerate(statuses)}
    is_ok, is_failed = cols["status"] == code.get("ok", -2), cols["status"] == code.get("failed", -2)
    for i in np.flatnonzero(~(is_ok | is_failed)):
        value = statuses[cols["status"][i]] if cols["status"][i] >= 0 else None
        problems.append(f"window {ids[i].decode()}: unknown status {value!r}")
    shard_null, row_null = cols["shard_null"], cols["row_null"]
    for i in np.flatnonzero(is_failed & ~(shard_null & row_null & ~cols["error_empty"])):
        problems.append(f"window {ids[i].decode()}: failed row must have shard/row null and an error")
    bad_ok = is_ok & (shard_null | row_null | ~cols["error_null"])
    for i in np.flatnonzero(bad_ok):
        problems.append(f"window {ids[i].decode()}: ok row must have shard and row and no error")
    return problems, is_ok & ~bad_ok


def find_corrupt_windows(cache: "CorrCache", shard_ids: Sequence[str] | None = None) -> list["CorruptCacheError"]:
    """Decode every chunk of every array of the given (default: all finished) shards and return one
    :class:`~cameo_corr.cache.shard.CorruptCacheError` per bad window (or per unreadable shard)."""
    import pyarrow.compute as pc


    if shard_ids is None:
        column = cache.manifest("ok", columns=["shard"]).column("shard")
        shard_ids = sorted(pc.unique(column).to_pylist())
    bad: list[CorruptCacheError] = []
    for sid in shard_ids:
        try:
            bad += cache.corrupt_windows(sid)
        except CorruptCacheError as e:
            bad.append(e)
    return bad


def repair_corrupt_shards(cache: "CorrCache") -> dict[str, list[str]]:
    """Find the corrupt windows (every chunk of every shard decoded) and drop their shards
    (:func:`~cameo_corr.cache.consolidation.drop_shards`), so the next ``preprocess`` run recomputes
    their windows. Returns ``{"shards": [...], "windows": [window ids whose rows were removed]}``."""

    shards = sorted({e.shard for e in find_corrupt_windows(cache)})
    windows = drop_shards(cache.location, shards)
    cache.refresh()
    return {"shards": shards, "windows": windows}


def verify_cache(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False,
                 grids: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """All problems found in the cache (empty list: the cache is consistent); see :func:`verify_report`."""
    return verify_report(cache, max_windows=max_windows, deep=deep, grids=grids).problems


def verify_report(cache: "CorrCache", *, max_windows: int | None = None, deep: bool = False,
                  grids: Sequence[tuple[int, int]] | None = None, selection: "WindowSelection | None" = None) -> VerifyReport:
    """Check the cache (see the module docstring); streams shard by shard.

    The arrays of every grid in ``grids`` (default: every grid the cache stores) are checked; the
    manifest's ``valid_frac``/``mask_frac`` against the primary grid's.
    The manifest checks read only ``window_id``, ``status``, ``shard``, ``row``, ``error`` of all rows.
    Then shards are visited in id order until ``max_windows`` ok windows were checked: each shard is
    opened and decoded once, and only the manifest rows of the visited shards are read in full. A
    corrupt chunk is a problem naming its window (it does not stop the check). ``deep`` also decodes
    every chunk of every shard, whatever ``max_windows``, and lists the bad windows in ``corrupt``.
    With ``selection`` only the selected windows (and, with ``deep``, the shards holding them) are checked.
    """
    import pyarrow as pa
    import pyarrow.compute as pc


    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1, got {max_windows}")
    cfg = cache.config
    primary = tuple(cfg.grid)
    check = [cache.select_grid(g) for g in (cfg.grids if grids is None else grids)]
    light_columns = ["window_id", "status", "shard", "row", "error"]
    if selection:

        light = _light_columns(selected_manifest(cache, selection, None, light_columns).to_batches())
        # rows of every ok window (selected or not) that the shards' rows are checked against
        referenced: dict[str, set[int]] = {}
        for sid, r in zip(*cache.manifest("ok", columns=["shard", "row"]).to_pydict().values()):
            referenced.setdefault(sid, set()).add(r)
    else:  # streamed: all rows as numpy columns, no Arrow table of them
        light = scan_manifest(cache.location, _light_columns, light_columns)
    report = VerifyReport()
    report.problems, ok_mask = _manifest_problems(light)
    report.windows_ok = int(ok_mask.sum())
    counts = np.bincount(light["shard"][ok_mask], minlength=len(light["shards"]))
    names = light["shards"]
    sizes = {names[k]: int(counts[k]) for k in sorted(np.flatnonzero(counts), key=names.__getitem__)}
    visit: list[str] = []
    budget = max_windows
    for sid, size in sizes.items():
        if budget is not None and budget <= 0:
            break
        visit.append(sid)
        if budget is not None:
            budget -= size
    codes = {name: k for k, name in enumerate(names)}
    chosen = ok_mask & np.isin(light["shard"], [codes[s] for s in visit])
    wanted = pa.array([w.decode() for w in light["ids"][chosen].tolist()], pa.string())
    del light
    columns = ["window_id", "status", "shard", "row", "num_views", "frame_ids", "valid_frac", "mask_frac"]
    if max_windows is None:
        expr = selection.expression() if selection else None
        full = read_manifest(cache.location, columns=columns, filter=pc.field("status") == "ok" if expr is None else (pc.field("status") == "ok") & expr)
    else:
        # streamed: the filter keeps a few rows of each batch, so the wide columns of the others never pile up
        full = scan_manifest(cache.location, lambda batches: pa.Table.from_batches(list(batches), _schema(columns)), columns,
                             pc.field("window_id").isin(wanted))
    rows_by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in full.to_pylist():
        if r["status"] == "ok" and r["shard"] in sizes:
            rows_by_shard.setdefault(r["shard"], []).append(r)
    for shard_id in visit:
        shard_rows = sorted(rows_by_shard.get(shard_id, []), key=lambda r: r["row"])
        for r in shard_rows:
            if r["num_views"] != cfg.views or len(r["frame_ids"]) != cfg.views:
                report.problems.append(f"window {r['window_id']}: {r['num_views']} views / {len(r['frame_ids'])} frame ids, "
                                       f"cache has S={cfg.views}")
        try:
            group = cache.open_shard(shard_id)
        except CameoCorrError as e:
            report.problems.append(f"shard {shard_id}: {e}")
            continue
        ids = list(group.attrs.get("window_ids", []))
        shapes = {key: group[key].shape for key in cfg.stored_keys()}
        W = shapes["nn"][0]
        if len(ids) != W or any(shape[0] != W for shape in shapes.values()):
            report.problems.append(f"shard {shard_id}: window_ids attribute and array lengths disagree")
            continue
        unreferenced = sorted(set(range(W)) - (referenced.get(shard_id, set()) if selection else {r["row"] for r in shard_rows}))
        if unreferenced:
            report.problems.append(f"shard {shard_id}: rows {unreferenced} have no manifest row")
        try:
            data: dict[tuple[int, int], dict[str, np.ndarray]] | None = {g: cache.read_shard(shard_id, grid=g) for g in check}
            bad_rows: set[int] = set()
        except CorruptCacheError:
            data, errors = None, cache.corrupt_windows(shard_id)
            report.problems += [str(e) for e in errors]
            report.corrupt += [(e.window, e.shard, e.array) for e in errors]
            bad_rows = {ids.index(e.window) for e in errors if e.window in ids}
        for r in shard_rows:
            if max_windows is not None and report.checked >= max_windows:
                break
            report.checked += 1
            where = f"window {r['window_id']} (shard {shard_id} row {r['row']})"
            k = r["row"]
            if not 0 <= k < W:
                report.problems.append(f"{where}: row outside the shard's {W} windows")
                continue
            if ids[k] != r["window_id"]:
                report.problems.append(f"{where}: shard row holds window {ids[k]}")
                continue
            if k in bad_rows:
                continue
            for g in check:
                if data is not None:
                    arrays = {n: data[g][n][k] for n in CACHE_ARRAYS}
                else:
                    arrays = cache.read_row(shard_id, k, r["window_id"], grid=g)
                at = where if len(cfg.grids) == 1 else f"{where} grid {g[0]}x{g[1]}"
                try:
                    validate_window_arrays(arrays, cfg.views, g, where=at)
                except CameoCorrError as e:
                    report.problems.append(str(e))
                    continue
                report.problems += [f"{at}: {p}" for p in check_window_consistency(arrays, cfg.tau, g)]
                if g != primary:
                    continue
                valid_frac, mask_frac = window_fractions(arrays)
                if abs(valid_frac - r["valid_frac"]) > 1e-6 or abs(mask_frac - r["mask_frac"]) > 1e-6:
                    report.problems.append(
                        f"{where}: manifest valid_frac/mask_frac {r['valid_frac']:.6f}/{r['mask_frac']:.6f} != arrays "
                        f"{valid_frac:.6f}/{mask_frac:.6f}"
                    )
    if deep:
        seen = {(w, sh, a) for w, sh, a in report.corrupt}
        visited = set(visit) if set(check) == set(cfg.grids) else set()  # --deep decodes the grids not checked too
        for e in find_corrupt_windows(cache, [s for s in sizes if s not in visited]):
            if (e.window, e.shard, e.array) not in seen:
                report.problems.append(str(e))
                report.corrupt.append((e.window, e.shard, e.array))
    return report


__all__ = ["check_window_consistency", "VerifyReport", "find_corrupt_windows", "repair_corrupt_shards", "verify_cache", "verify_report"]
