"""The command line behaves like a finished tool: every error a user can cause is one line
``cameo-corr <command>: error: <what>, <where>`` with exit 2 (1 for a failed run), never a traceback;
Ctrl-C, a closed pipe and a full disk end quietly. Everything here runs the real ``cameo-corr`` in a
subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cameo_corr.cli import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, build_parser, subcommand_parsers
from cameo_corr.cache.viz import spread_matches

CLI = [sys.executable, "-m", "cameo_corr.cli"]


def run(*args: str, stdout: object = subprocess.PIPE, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


def run_all(*commands: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run independent commands at the same time (each is a fresh interpreter; this keeps the suite short)."""
    procs = [subprocess.Popen([*CLI, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for c, p in zip(commands, procs):
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


def one_error_line(proc: subprocess.CompletedProcess, command: str, code: int, *needles: str) -> str:
    """Assert exit ``code`` and a single ``cameo-corr <command>: error:`` line containing ``needles``."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"cameo-corr {command}: error: ")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- caches made in process
def _write_cache(root: Path, views: int, *, ok: bool) -> Path:
    """A real cache of synthetic windows (depth backend + matcher, as the Ray workers compute them);
    with ``ok=False`` every window is recorded as failed."""
    from cameo_corr.datasets.base import open_dataset
    from cameo_corr.datasets.canonical import CanonicalView, load_window
    from cameo_corr.datasets.synthetic import generate_dataset
    from cameo_corr.pipeline.backends import make_backend
    from cameo_corr.cache.shard import window_arrays
    from cameo_corr.cache.writer import CacheWriter, WindowOutcome
    from cameo_corr.pipeline.match import correspond
    from cameo_corr.datasets.planner import PlanConfig, plan_windows
    from cameo_corr.schemas import CacheConfig

    data = generate_dataset(root / "data", scenes=2, frames=6, image_size=64, seed=1)
    reader = open_dataset("synthetic", data)
    backend = make_backend("depth", device="cpu")
    view = CanonicalView(size=64, policy=reader.default_crop_policy)
    cfg = CacheConfig(grid=(8, 8), tau=1.5, views=views, backend=backend.describe(), crop=view.to_dict(), dataset=reader.describe())
    outcomes = []
    for w in plan_windows(reader, PlanConfig(views=views, windows_per_scene=1, policy="random"), cfg.fingerprint()):
        if not ok:
            outcomes.append(WindowOutcome(w.record, error="DatasetError: made to fail by the test"))
            continue
        result = backend(load_window(reader, w.record, view, with_depth=True))
        outcomes.append(WindowOutcome(w.record, arrays=window_arrays(correspond(result, grid=cfg.grid, tau=cfg.tau), result)))
    writer = CacheWriter(root / "cache", cfg)
    writer.initialize()
    writer.write_shard("s0", outcomes)
    return root / "cache"


@pytest.fixture(scope="module")
def cache3(tmp_path_factory) -> Path:
    """Two ok windows of S=3 views on an 8x8 grid."""
    return _write_cache(tmp_path_factory.mktemp("ok"), 3, ok=True)


@pytest.fixture(scope="module")
def failed_cache(tmp_path_factory) -> Path:
    """A cache whose every window failed."""
    return _write_cache(tmp_path_factory.mktemp("failed"), 3, ok=False)


# --------------------------------------------------------------------------- every command's --help
def test_every_subcommand_help_exits_0_and_survives_a_closed_pipe():
    commands = [leaf.prog.split()[1:] for leaf in subcommand_parsers(build_parser())]
    assert {"demo", "preprocess", "eval-corr", "train"} <= {c[0] for c in commands} and ["cache", "viz"] in commands
    runs = {}
    for words in [[], *commands]:  # all at once: each is a fresh interpreter
        runs[tuple(words)] = subprocess.Popen([*CLI, *words, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        closed = subprocess.Popen([*CLI, *words, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        closed.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
        runs[("closed", *words)] = closed
    helps = {}
    for key, proc in runs.items():
        out, err = proc.communicate(timeout=120) if key[:1] != ("closed",) else (None, proc.stderr.read())
        proc.wait(timeout=120)
        if key[:1] == ("closed",):
            # argparse itself ignores a failed write of a long help text (exit 0); a short one fails at our flush (141)
            assert proc.returncode in (0, EXIT_BROKEN_PIPE) and err == "", (key, proc.returncode, err)
        else:
            assert proc.returncode == 0 and "Traceback" not in err, (key, err)
            assert out.startswith("usage: cameo-corr" + "".join(f" {w}" for w in key)), (key, out[:200])
            helps[" ".join(key)] = out
    eval_help = helps["eval-corr"]
    description = eval_help.split("\n\n")[1]
    assert not description.startswith("`") and "``" not in eval_help
    from cameo_corr.pipeline.evaluate import depth_dataset_names

    offered = depth_dataset_names()  # only readers with depth are offered (another one is refused naming these)
    assert f"a dataset with depth: {', '.join(offered)}" in " ".join(eval_help.split()) and "re10k" not in eval_help
    assert {"synthetic", "co3d", "7scenes"} <= set(offered)
    assert "tiny_cpu" in helps["train"] and "sd21_cameo" in helps["train"]


# --------------------------------------------------------------------------- the global error layer
def test_stats_and_verify_json_for_scripts(cache3, failed_cache, tmp_path):
    import json
    import shutil

    from test_cache import _flip_chunk_byte

    from cameo_corr.cache.layout import shard_dir

    broken = tmp_path / "broken"
    shutil.copytree(cache3, broken)
    _flip_chunk_byte(broken / shard_dir("s0"), "mask")
    stats, good, failed, corrupt = run_all(["cache", "stats", str(cache3), "--json"], ["cache", "verify", str(cache3), "--json"],
                                           ["cache", "verify", str(failed_cache), "--json"],
                                           ["cache", "verify", str(broken), "--json", "--deep"])
    s = json.loads(stats.stdout)
    assert stats.returncode == 0 and s["windows_ok"] == 2 and s["windows_failed"] == 0 and s["views"] == 3 and s["grid"] == [8, 8]
    v = json.loads(good.stdout)
    assert good.returncode == 0 and good.stderr == ""
    assert v == {"ok": True, "path": str(cache3), "grids": [[8, 8]], "deep": False, "selection": None, "windows_ok": 2,
                 "checked": 2, "problems": [], "corrupt": [], "orphans": []}
    f = json.loads(failed.stdout)
    assert failed.returncode == 1 and not f["ok"] and f["windows_ok"] == 0 and f["checked"] == 0
    c = json.loads(corrupt.stdout)
    assert corrupt.returncode == 1 and not c["ok"] and c["problems"]
    assert {(x["shard"], x["array"]) for x in c["corrupt"]} == {("s0", "mask")} and len(c["corrupt"]) == 2


def test_closed_pipe_while_printing_results_is_quiet(cache3):
    proc = subprocess.Popen([*CLI, "cache", "stats", str(cache3)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE and err == "", err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, default_sigint):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # `train --config` blocks reading it: the command is surely running when we press Ctrl-C
    proc = subprocess.Popen([*CLI, "train", "--config", str(fifo), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while True:  # opening the write end without blocking succeeds once the command has opened the read end
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip() == "cameo-corr train: interrupted" and out == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to simulate a full disk")
def test_full_disk_and_bad_output_path(cache3, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    full_png, bad_path = run_all(["cache", "viz", str(cache3), "--out", "/dev/full"],
                                 ["cache", "viz", str(cache3), "--out", str(blocker / "x.png")])
    one_error_line(full_png, "cache viz", 1, "no space left on device, /dev/full")
    one_error_line(bad_path, "cache viz", 2, str(blocker))  # a path problem is the user's: exit 2
    with open("/dev/full", "w") as full:
        one_error_line(run("cache", "stats", str(cache3), stdout=full), "cache stats", 1, "no space left on device")


# --------------------------------------------------------------------------- cache viz
def test_viz_errors_name_the_valid_choices(cache3, failed_cache, tmp_path):
    from cameo_corr.cache.reader import CorrCache

    png = str(tmp_path / "x.png")
    ids = CorrCache(cache3).window_ids()
    failed_id = CorrCache(failed_cache).manifest(None).column("window_id").to_pylist()[0]
    ok, failed = ["cache", "viz", str(cache3), "--out", png], ["cache", "viz", str(failed_cache), "--out", png]
    no_ok, bad_id, failed_window, bad_pair, same_pair, no_matches = run_all(
        failed, [*ok, "--window", "bad"], [*failed, "--window", failed_id], [*ok, "--pair", "0", "9"],
        [*ok, "--pair", "1", "1"], [*ok, "--matches", "0"])
    one_error_line(no_ok, "cache viz", 2, "no ok window to draw", str(failed_cache))
    one_error_line(bad_id, "cache viz", 2, "no ok window 'bad'", ids[0], ids[1])
    one_error_line(failed_window, "cache viz", 2, "failed (DatasetError: made to fail by the test)")
    one_error_line(bad_pair, "cache viz", 2, "--pair 0 9", "0..2", "S=3")
    one_error_line(same_pair, "cache viz", 2, "two different views")
    one_error_line(no_matches, "cache viz", 2, "--matches")
    assert not Path(png).exists()


def test_viz_picture_and_its_numbers(cache3, tmp_path):
    from PIL import Image

    from cameo_corr.cache.reader import CorrCache
    from cameo_corr.cache.viz import pair_coverage

    png = tmp_path / "v.png"
    proc = run("cache", "viz", str(cache3), "--out", str(png), "--pair", "2", "0", "--matches", "5")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[1] >= 1000 and img.std() > 20
    # no blank panel: every quadrant of the figure carries content
    H, W = img.shape[:2]
    for quadrant in (img[: H // 2, : W // 2], img[: H // 2, W // 2 :], img[H // 2 :, : W // 2], img[H // 2 :, W // 2 :]):
        assert (quadrant.std(axis=-1) > 10).mean() > 0.05 or quadrant.std() > 30
    # the matrix's denominator is the query view's valid tokens, as in the title
    arrays = CorrCache(cache3).window(CorrCache(cache3).window_ids()[0])
    valid, mask = arrays["valid"].reshape(3, -1), arrays["mask"]
    cover = pair_coverage(mask, valid)
    assert np.isnan(cover[0, 0]) and cover[2, 0] == pytest.approx(mask[2, 0].sum() / valid[2].sum())


def test_spread_matches_keeps_picks_apart_and_off_the_border():
    grid = (16, 16)
    queries = np.arange(256)
    picks = spread_matches(queries, queries, grid, 6)
    assert len(picks) == 6 and list(picks) == sorted(picks)
    x, y = picks % 16, picks // 16
    assert x.min() > 0 and y.min() > 0 and x.max() < 15 and y.max() < 15
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(6) * 99
    assert d.min() >= 3  # six picks on a 16x16 grid keep several tokens apart
    # two queries hitting the same key token are not both picked while others are available
    targets = np.where(queries < 128, 0, queries)
    picks = spread_matches(queries, targets, grid, 4)
    assert (picks < 128).sum() <= 1
    assert list(spread_matches(np.array([5, 9]), np.array([5, 9]), grid, 10)) == [5, 9]


# --------------------------------------------------------------------------- eval-corr
def test_eval_corr_says_when_it_evaluates_fewer_windows(shared_data):
    root = shared_data / "sevenscenes_stairs"
    common = ["eval-corr", "--dataset", "7scenes", "--root", str(root), "--windows", "8", "--grid", "4", "--crop-size", "32",
              "--split", "all"]
    short, more, random, tau, depthless, flag = run_all(
        [*common, "--views", "3"], [*common, "--views", "2", "--sampling", "random"], [*common, "--views", "2"],
        [*common, "--tau", "-1"], ["eval-corr", "--dataset", "re10k", "--root", str(root)],
        ["eval-corr", "--dataset", "7scenes", "--root", str(root), "--dataset-option", "split=nosuch"])

    def note(proc: subprocess.CompletedProcess) -> str:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "of 8 requested" in proc.stdout
        lines = [line for line in proc.stderr.splitlines() if line.startswith("cameo-corr eval-corr: note: evaluated ")]
        assert len(lines) == 1 and "of the 8 requested windows" in lines[0], proc.stderr
        return lines[0]

    # 4 sequences of 3 frames: with 3 views each gives exactly one window, so no option is suggested
    assert "neither more windows per scene nor" in note(short) and "raise --windows-per-scene" not in note(short)
    assert "--windows-per-scene 2 gives 7" in note(more)  # random pairs of 3 frames: 3 per scene, 7 of the 8 asked
    # stride windows of 2 views span the whole (clamped) sequence: more of them coincide; random sampling helps
    assert "--windows-per-scene 2 --sampling random gives 7" in note(random) and "clamped to the scene" in note(random)
    one_error_line(tau, "eval-corr", 2, "--tau: must be a finite number >= 0", "got -1.0")
    line = one_error_line(depthless, "eval-corr", 2, "--dataset re10k: this dataset has no ground-truth depth", "7scenes")
    assert "cache.json" not in line
    one_error_line(flag, "eval-corr", 2, "[split]: unknown split 'nosuch'")
    one_error_line(run("eval-corr", "--dataset", "7scenes", "--root", str(root), "--windows", "0"), "eval-corr", 2, "--windows: must be >= 1")


# --------------------------------------------------------------------------- train
def test_train_explains_view_count_and_blames_the_command_line(cache3, tmp_path):
    out = str(tmp_path / "run")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_steps: abc\n")
    common = ["train", "--cache", str(cache3), "--out", out, "--config"]
    views, override, in_file, steps, missing = run_all(
        [*common, "tiny_cpu"], [*common, "tiny_cpu", "train.max_steps=abc"], [*common, str(bad_yaml)],
        [*common, "tiny_cpu", "--max-steps", "0"], [*common, "tiny_gpu"])
    one_error_line(views, "train", 2, "data.num_views=4", "S=3", "pass data.num_views=3", "cache.json")
    line = one_error_line(override, "train", 2, "command-line override 'train.max_steps=abc'", "train.max_steps")
    assert "tiny_cpu.yaml" not in line
    one_error_line(in_file, "train", 2, str(bad_yaml), "train.max_steps")
    one_error_line(steps, "train", 2, "--max-steps must be at least 1")
    one_error_line(missing, "train", 2, "tiny_gpu", "not a built-in preset (sd21_cameo, tiny_cpu)")


# --------------------------------------------------------------------------- demo (the slow run is in test_demo.py)
def test_demo_rejects_bad_settings_before_doing_work(tmp_path):
    one_error_line(run("demo", "--out", str(tmp_path / "d"), "--frames", "2"), "demo", 2, "--frames must be at least 4")
    foreign = tmp_path / "foreign"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "something").write_text("x")
    one_error_line(run("demo", "--out", str(foreign)), "demo", 2, "demo.json", str(foreign))


def test_gitignore_has_the_demo_output():
    lines = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "demo-run/" in lines


def test_argparse_errors_are_one_line_naming_the_command(capsys):
    """What argparse refuses (a missing flag, an unknown one, a bad choice) is one line naming the
    command, exit 2, without the usage (``--help`` shows it)."""
    from cameo_corr.cli import main

    cases = [
        (["preprocess", "--dataset", "synthetic", "--root", "r", "--out", "o", "--bogus-flag"],
         "cameo-corr preprocess: error: unrecognized arguments: --bogus-flag"),
        (["cache", "stats", "c", "--nope", "1"], "cameo-corr cache stats: error: unrecognized arguments: --nope 1"),
        (["preprocess", "--dataset", "synthetic", "--root", "r"], "cameo-corr preprocess: error: the following arguments are required: --out"),
        (["cache"], "cameo-corr cache: error: the following arguments are required: {stats,verify,viz,compact,migrate,merge}"),
    ]
    for argv, line in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == line + "\n", (argv, err)

