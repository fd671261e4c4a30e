"""``cameo-corr cache viz``: a PNG of one window (:func:`render_viz`).

Two labelled views with a few numbered, well-spread cycle-consistent matches, the query view's tokens
by status and the matched share of valid query tokens for every view pair. Images come from the
dataset through ``CorrCache.reader()`` and ``CorrCache.view()``, i.e. the same canonical crop the cache
was computed on, or from the cache's stored views when it has them (``preprocess --store-images``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from cameo_corr.schemas import WindowRecord, token_coords

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cameo_corr.cache.reader import CorrCache


def load_window_images(cache: "CorrCache", row: Mapping[str, Any]) -> np.ndarray:
    """``[S, size, size, 3]`` uint8 canonical views of the cached window of manifest ``row``: the stored
    views of a self-contained cache (``--store-images``), else read from its dataset."""
    from cameo_corr.datasets.canonical import load_window

    if cache.config.images is not None:
        from cameo_corr.datasets.image_io import decode_view

        shard, r = cache.locate(row["window_id"])
        stored = cache.read_row(shard, r, row["window_id"], names=("images", "image_nbytes"))
        size = int(cache.view().size)
        return np.stack([decode_view(data, int(n), size, where=f"{cache.location.display}: window {row['window_id']}")
                         for data, n in zip(stored["images"], stored["image_nbytes"])])
    reader = cache.reader()
    frames = {f.frame_id: f for f in reader.scene(row["scene_id"]).frames}
    record = WindowRecord.from_frames(row["window_id"], row["dataset"], row["split"], row["scene_id"], row["frame_ids"], frames,
                                      root=str(reader.root))
    return load_window(reader, record, cache.view()).images



MATCH_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
"""Marker colours of the drawn matches (matplotlib's tab10), cycled; each marker also carries its number."""
STATUS_COLORS = {"matched": "#0072B2", "unmatched": "#E69F00", "invalid": "#000000"}
"""Token status overlay (Okabe-Ito blue / orange, readable with colour-vision deficiencies; black = no geometry)."""
DEFAULT_MATCHES = 10



def spread_matches(queries: np.ndarray, targets: np.ndarray, grid: tuple[int, int], count: int) -> np.ndarray:
    """Up to ``count`` of the query token indices ``queries`` (matched to ``targets`` in the key view),
    spread over both views; returned in row-major order of the query.

    Farthest-point sampling in both views at once: a candidate's distance to the picks is the smaller
    of its query-view and key-view distances, and the image borders count as picks, so the markers
    keep away from each other and from the edges in both views (the first pick is the most central).
    """
    queries = np.asarray(queries, dtype=np.int64)
    if len(queries) <= count:
        return queries
    h, w = grid
    xy = token_coords(grid).astype(np.float64)
    q, k = xy[queries], xy[np.asarray(targets, dtype=np.int64)]

    def border(p: np.ndarray) -> np.ndarray:
        return np.minimum.reduce([p[:, 0] + 0.5, w - 0.5 - p[:, 0], p[:, 1] + 0.5, h - 0.5 - p[:, 1]]) ** 2

    d2 = np.minimum(border(q), border(k))
    chosen: list[int] = []
    while len(chosen) < count:
        c = int(np.argmax(d2))
        chosen.append(c)
        d2 = np.minimum(d2, np.minimum(((q - q[c]) ** 2).sum(-1), ((k - k[c]) ** 2).sum(-1)))
    return np.sort(queries[chosen])


def pair_coverage(mask: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[S, S]`` share of view i's *valid* tokens with a cycle-consistent match in view j (NaN on the
    diagonal and for views without a valid token): the one denominator the whole picture uses."""
    S = mask.shape[0]
    n_valid = valid.reshape(S, -1).sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cover = mask.sum(axis=2) / n_valid[:, None]
    cover[np.eye(S, dtype=bool)] = np.nan
    return cover


def render_viz(
    cache: "CorrCache", window_id: str, out: str | Path, *, pair: tuple[int, int] = (0, 1), matches: int = DEFAULT_MATCHES,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Write the correspondence picture of one window to ``out`` (PNG).

    Top: query view ``i`` and key view ``j`` as two labelled panels; ``matches`` numbered, well-spread
    cycle-consistent query tokens of view i and their nearest neighbours in view j, joined across the
    gap. Bottom left: every token of view i by status for key view j (matched / valid without a
    consistent match / no geometry). Bottom right: the same share for every view pair. Every share
    is over the query view's *valid* tokens, so the title, the status counts and the highlighted
    cell of the matrix agree. ``grid`` picks the token grid of a multi-grid cache (default: the primary one).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import ConnectionPatch, Patch, Rectangle

    grid = cache.select_grid(grid)
    arrays = cache.window(window_id, grid=grid)
    row = cache.row(window_id)
    images = load_window_images(cache, row)
    S, size = images.shape[0], images.shape[1]
    i, j = pair
    if not (0 <= i < S and 0 <= j < S and i != j):
        raise ValueError(f"pair {pair} must be two different views in [0, {S})")
    if matches < 1:
        raise ValueError(f"matches must be >= 1, got {matches}")
    h, w = grid
    hw = h * w
    nn, mask, valid = arrays["nn"].astype(np.int64), np.asarray(arrays["mask"]), np.asarray(arrays["valid"]).reshape(S, hw)
    xy = token_coords((h, w))
    centres = np.stack([(xy[:, 0] + 0.5) * size / w, (xy[:, 1] + 0.5) * size / h], axis=-1)
    n_valid, n_masked = int(valid[i].sum()), int(mask[i, j].sum())
    masked = np.flatnonzero(mask[i, j])
    shown = spread_matches(masked, nn[i, j, masked], (h, w), matches)
    frames = row["frame_ids"]

    fig = plt.figure(figsize=(12, 11.5))
    outer = fig.add_gridspec(2, 1, height_ratios=[1, 1], hspace=0.2, left=0.04, right=0.96, top=0.85, bottom=0.09)
    top = outer[0].subgridspec(1, 2, wspace=0.12)
    bottom = outer[1].subgridspec(1, 2, wspace=0.3)
    fig.suptitle(f"window {window_id}  ·  {row['dataset']} scene {row['scene_id']}  ·  {S} views, {h}x{w} tokens, "
                 f"tau={cache.config.tau:g}", fontsize=13, fontweight="bold")
    share = f" ({100 * n_masked / n_valid:.1f}%)" if n_valid else ""
    fig.text(0.5, 0.905, f"view {i} -> view {j}: {n_masked} of {n_valid} valid query tokens{share} have a cycle-consistent match\n"
             + (f"{len(shown)} of them spread over view {i}: circle n on the left is a query token, circle n on the right "
                f"its nearest 3D point in view {j}" if len(shown) else "no match to draw"),
             ha="center", va="center", fontsize=11, linespacing=1.5)

    ax_i, ax_j = fig.add_subplot(top[0, 0]), fig.add_subplot(top[0, 1])
    for ax, v, role in ((ax_i, i, "query"), (ax_j, j, "key")):
        ax.imshow(images[v], extent=(0, size, size, 0))
        ax.set_title(f"{role} view {v}  (frame {frames[v]})", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_linewidth(2)
    for k, x in enumerate(shown):  # figure-level artists: lines over both panels, markers over the lines
        color = MATCH_COLORS[k % len(MATCH_COLORS)]
        (u0, v0), (u1, v1) = centres[x], centres[nn[i, j, x]]
        fig.add_artist(ConnectionPatch((u0, v0), (u1, v1), "data", "data", axesA=ax_i, axesB=ax_j, color=color,
                                       linewidth=1.3, alpha=0.7, zorder=3))
        for ax, (u, v) in ((ax_i, (u0, v0)), (ax_j, (u1, v1))):
            fig.add_artist(Line2D([u], [v], transform=ax.transData, marker="o", markersize=15, markerfacecolor=color,
                                  markeredgecolor="white", markeredgewidth=1.5, zorder=4))
            fig.text(u, v, str(k + 1), transform=ax.transData, ha="center", va="center", fontsize=8, fontweight="bold",
                     color="white", zorder=5)

    status = np.where(mask[i, j], 0, np.where(valid[i], 1, 2)).reshape(h, w)
    counts = [int((status == s).sum()) for s in range(3)]
    ax = fig.add_subplot(bottom[0, 0])
    gray = images[i].astype(np.float64).mean(axis=-1)
    ax.imshow(gray, extent=(0, size, size, 0), cmap="gray", vmin=0, vmax=255)
    cmap = ListedColormap([to_rgba(STATUS_COLORS[k]) for k in ("matched", "unmatched", "invalid")])
    ax.imshow(status, extent=(0, size, size, 0), cmap=cmap, vmin=-0.5, vmax=2.5, alpha=0.55, interpolation="nearest")
    ax.set_title(f"tokens of view {i}, matched in view {j}?", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(handles=[
        Patch(color=STATUS_COLORS["matched"], alpha=0.7, label=f"cycle-consistent match ({counts[0]})"),
        Patch(color=STATUS_COLORS["unmatched"], alpha=0.7, label=f"valid, no consistent match ({counts[1]})"),
        Patch(color=STATUS_COLORS["invalid"], alpha=0.7, label=f"no geometry, not a query ({counts[2]})"),
    ], loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, fontsize=9, frameon=False)

    cover = pair_coverage(mask, valid)
    ax = fig.add_subplot(bottom[0, 1])
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(cover), vmin=0, vmax=1, cmap=cmap)
    for a in range(S):
        for b in range(S):
            text = "self" if a == b else ("-" if np.isnan(cover[a, b]) else f"{cover[a, b]:.2f}")
            dark = a == b or np.isnan(cover[a, b]) or cover[a, b] > 0.6
            ax.text(b, a, text, ha="center", va="center", fontsize=9 if S <= 8 else 6, color="black" if dark else "white")
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=3))
    ax.set_xticks(range(S))
    ax.set_yticks(range(S))
    ax.set_xlabel("key view j")
    ax.set_ylabel("query view i")
    ax.set_title("all view pairs: matched share of valid query tokens", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.8, label="matched / valid query tokens")
    ax.legend(handles=[Line2D([], [], color="#d62728", linewidth=3, label=f"the pair drawn above ({i} -> {j})")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, frameon=False)

    png = io.BytesIO()  # rendered in memory, then written: a failed write (full disk) raises instead of being lost
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.write_bytes(png.getvalue())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(out)) from e  # name the file (a failed write does not)
    return out


__all__ = ["load_window_images", "MATCH_COLORS", "STATUS_COLORS", "DEFAULT_MATCHES", "spread_matches", "pair_coverage", "render_viz"]
