"""``cameo-corr selfcheck``: the device selection of every check (CUDA variants chosen on a CPU-only
machine without calling CUDA), the checks that run on CPU, failure reporting, and the CLI end to end
in CPU mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cameo_corr import selfcheck
from cameo_corr.selfcheck import (
    CHECKS,
    Context,
    Row,
    check_matching,
    decreasing,
    exit_code,
    format_table,
    match_backends,
    preprocess_options,
    relative_error,
    run_selfcheck,
    trainer_precision,
    vggt_precisions,
)

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_decreasing_compares_the_means_of_the_first_and_last_k() -> None:
    assert decreasing([5, 6, 4, 3, 4, 2], 2)
    assert not decreasing([5, 1, 4, 3, 4, 6], 2)  # one low value early does not make a trend
    assert decreasing([3, 9, 1, 1, 8, 1], 3)  # first 13/3, last 10/3
    assert not decreasing([1, 8, 1, 3, 9, 1], 3)
    with pytest.raises(ValueError, match="at least 6 values"):
        decreasing([1, 2, 3], 3)


def test_relative_error_is_l2_over_finite_reference_entries() -> None:
    ref = torch.tensor([3.0, 4.0, math.inf])
    assert relative_error(torch.tensor([3.0, 4.0, 0.0]), ref) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5, 0.0]), ref) == pytest.approx(0.1)
    assert relative_error(torch.tensor([math.nan, 4.0, 0.0]), ref) == math.inf


def test_cuda_variants_are_chosen_by_device_without_calling_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [reason is None for _, reason in match_backends(CPU)] == [True, True, True]
    cuda_backends = dict(match_backends(CUDA))  # resolving names only: no CUDA call
    assert cuda_backends["kdtree"] is None and cuda_backends["torch"] is None
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):  # faiss-cpu: the faiss-gpu row is a skip with the fix
        assert "no GPU support" in cuda_backends["faiss"] and "cameo-corr[gpu]" in cuda_backends["faiss"]

    assert all(reason and "CUDA autocast" in reason for _, reason in vggt_precisions(CPU))
    # a V100 / T4: bf16 only through emulation (torch's default answer counts it as support)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert dict(vggt_precisions(CUDA)) == {"bfloat16": "this GPU has no bf16 support (compute capability < 8.0)", "float16": None}
    assert trainer_precision(CUDA) == ("no", "fp32 (no bf16 on this GPU)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert dict(vggt_precisions(CUDA)) == {"bfloat16": None, "float16": None}
    assert trainer_precision(CUDA) == ("bf16", "bf16")
    assert trainer_precision(CPU) == ("no", "fp32")


def test_preprocess_options_use_only_keywords_run_preprocess_takes() -> None:
    from cameo_corr.job.config import JobConfig

    gpu, cpu = preprocess_options(CUDA), preprocess_options(CPU)
    assert gpu["gpus_per_worker"] == 1 and "backend_options" not in gpu  # the backend takes the GPU Ray assigns
    assert cpu["gpus_per_worker"] == 0 and cpu["backend_options"] == {"device": "cpu"}
    for options in (gpu, cpu):  # run_preprocess(**options) is run_job(JobConfig(**options))
        JobConfig(root="data", out="cache", command="selfcheck", **options)


def test_matching_check_passes_on_cpu_and_catches_a_wrong_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = check_matching(Context(CPU, tmp_path))
    assert [(r.check, r.status) for r in rows] == [("matching kdtree", "ok"), ("matching torch", "ok"), ("matching faiss", "ok"),
                                                   ("faiss rounding", "ok")]
    assert all("identical" in r.result and "lattice and smooth" in r.result and r.seconds is not None for r in rows[:3])
    assert "100.0% of smooth queries certified" in rows[3].result  # the smooth set exercises faiss's re-rank

    from cameo_corr.pipeline import match

    real = match.match_tokens

    def off_by_one(points, valid, *, backend="auto", **kw):
        nn, dist, mask = real(points, valid, backend=backend, **kw)
        if backend == "faiss":
            nn = nn.clone()
            nn[0, 1, :3] += 1
        return nn, dist, mask

    monkeypatch.setattr(match, "match_tokens", off_by_one)
    rows = check_matching(Context(CPU, tmp_path))
    assert [r.status for r in rows] == ["ok", "ok", "FAIL", "ok"]
    assert "lattice: 3 nn" in rows[2].result and "smooth: 3 nn" in rows[2].result
    monkeypatch.setattr(match, "match_tokens", real)

    rounding = match.faiss_rounding
    monkeypatch.setattr(match, "faiss_rounding", lambda q, k: {**rounding(q, k), "error": 2 * rounding(q, k)["bound"]})
    rows = check_matching(Context(CPU, tmp_path))  # a faiss rounding beyond the bound its certification assumes
    assert [r.status for r in rows] == ["ok", "ok", "ok", "FAIL"] and "error 32 x 2^-24" in rows[3].result
    monkeypatch.setattr(match, "faiss_rounding", rounding)

    def kdtree_crashes(points, valid, *, backend="auto", **kw):
        if backend == "kdtree":
            raise ModuleNotFoundError("No module named 'somelib'")
        return real(points, valid, backend=backend, **kw)

    monkeypatch.setattr(match, "match_tokens", kdtree_crashes)  # one crashing matcher hides neither of the others
    rows = check_matching(Context(CPU, tmp_path))
    assert [(r.check, r.status) for r in rows] == [("matching kdtree", "FAIL"), ("matching torch", "ok"), ("matching faiss", "ok"),
                                                   ("faiss rounding", "ok")]
    assert rows[0].result == "raised ModuleNotFoundError: No module named 'somelib'"
    monkeypatch.setattr(match, "match_tokens", real)

    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # not installed (as on a GPU machine without faiss-gpu): both rows say so
    rows = check_matching(Context(CPU, tmp_path))
    assert [(r.check, r.status) for r in rows] == [("matching kdtree", "ok"), ("matching torch", "ok"), ("matching faiss", "skip"),
                                                   ("faiss rounding", "skip")]
    assert rows[3].result == rows[2].result and "faiss" in rows[3].result



def test_trainer_check_autocasts_the_model_forward_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_train_cache: Path,
                                                        fresh_accelerate_state: None) -> None:
    """The trainer check in bf16 (the GPU variant's precision, here through accelerate's CPU autocast):
    as in the Trainer, the model's forward runs under autocast and the camera rays reach it in fp32,
    computed outside it; the steps pass the check (finite, decreasing)."""
    from cameo_corr.train.loop import CameoTrainable

    seen: list[tuple[bool, torch.dtype]] = []
    forward = CameoTrainable.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), kwargs["plucker"].dtype))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CameoTrainable, "forward", recording_forward)
    monkeypatch.setattr(selfcheck, "trainer_precision", lambda device: ("bf16", "bf16"))
    monkeypatch.setitem(selfcheck.TRAIN_STEPS, "cpu", 4)
    [row] = selfcheck.check_trainer(Context(CPU, tmp_path, cache=tiny_train_cache))
    assert row.status == "ok", row
    assert row.check == "trainer 4 steps bf16"
    assert seen == [(True, torch.float32)] * 4
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.slow
def test_official_trainer_check_runs_and_resumes(tmp_path: Path, tiny_train_cache: Path, fresh_accelerate_state: None) -> None:
    """The official_bf16 check's runs through the real ``train`` (on CPU with identity latents; the GPU check
    adds the tiny VAE under CUDA's fp16 autocast): three steps straight, and two then one resumed from the
    checkpoint, whose last step equals the straight one's bit for bit here; on CPU the check itself is a skip."""
    straight, resumed = selfcheck.official_trainer_run(tiny_train_cache, tmp_path, vae="identity")
    steps = list(range(1, selfcheck.OFFICIAL_STEPS + 1))
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == steps
    assert all(math.isfinite(r["loss"]) for r in straight + resumed)
    assert all(straight[-1][k] == resumed[-1][k] for k in ("loss", "diffusion", "cameo"))
    assert straight[0]["loss"] != straight[-1]["loss"]
    [row] = selfcheck.check_official_trainer(Context(CPU, tmp_path, cache=tiny_train_cache))
    assert row.status == "skip" and "CUDA" in row.result

def test_sd21_layer_10_size() -> None:
    size = selfcheck.sd21_layer_size()
    assert size.grid == (32, 32) and size.tokens == 1024
    assert size.module.heads == 10 and size.module.to_q.in_features == 640
    assert size.module.to_q.weight.device.type == "meta"


def test_a_crashing_check_is_a_failed_row_and_exit_code_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: Context) -> list[Row]:
        raise RuntimeError("boom")

    def fine(ctx: Context) -> list[Row]:
        return [Row("fine", str(ctx.device), "ok", "measured", 0.5, "exact")]

    monkeypatch.setattr(selfcheck, "CHECKS", (("broken", broken), ("fine", fine)))
    rows = run_selfcheck("cpu", workdir=tmp_path)
    assert [(r.check, r.status) for r in rows] == [("broken", "FAIL"), ("fine", "ok")]
    assert rows[0].result == "raised RuntimeError: boom"
    assert exit_code(rows) == 1 and exit_code(rows[1:]) == 0
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["check", "device", "result", "time", "tolerance"]
    assert "FAIL: raised RuntimeError: boom" in table and "0.50 s" in table


def test_strict_fails_a_run_with_a_skipped_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """On a GPU machine meant to have faiss-gpu and vggt, ``--strict`` turns their skips into exit 1."""
    def skipped(ctx: Context) -> list[Row]:
        return [Row("matching faiss", str(ctx.device), "skip", "the installed faiss has no GPU support")]

    monkeypatch.setattr(selfcheck, "CHECKS", (("skipped", skipped),))
    assert selfcheck.main(["--device", "cpu", "--workdir", str(tmp_path)]) == 0
    assert selfcheck.main(["--device", "cpu", "--workdir", str(tmp_path), "--strict"]) == 1
    assert "0 ok, 0 failed, 1 skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="status must be one of"):
        Row("x", "cpu", "passed", "")


def test_cli_refuses_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from cameo_corr.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["selfcheck", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "cameo-corr selfcheck: error: no CUDA device is visible, --device cuda"
    assert main(["selfcheck", "--device", "mps"]) == 2
    assert "only cuda and cpu devices are checked" in capsys.readouterr().err


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_vggt_check_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("vggt.models.vggt", reason="the real vggt package is not installed (optional extra)")
    rows = selfcheck.check_vggt(Context(CPU, tmp_path))
    assert [(r.check, r.status) for r in rows] == [
        ("vggt single-head vs forward", "ok"), ("vggt bfloat16 vs float32", "skip"), ("vggt float16 vs float32", "skip")]
    assert "identical" in rows[0].result


@pytest.mark.vggt
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_a_crash_in_the_single_head_check_is_its_row_and_the_precision_rows_follow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vggt.models.vggt", reason="the real vggt package is not installed (optional extra)")
    from cameo_corr.pipeline.backends.vggt import VGGTBackend

    def crash(self, images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(VGGTBackend, "predict", crash)
    rows = selfcheck.check_vggt(Context(CPU, tmp_path))
    assert [(r.check, r.status) for r in rows] == [
        ("vggt single-head vs forward", "FAIL"), ("vggt bfloat16 vs float32", "skip"), ("vggt float16 vs float32", "skip")]
    assert rows[0].result == "raised RuntimeError: CUDA error: an illegal memory access was encountered"


@pytest.mark.slow
def test_cli_selfcheck_cpu_mode_end_to_end(tmp_path: Path) -> None:
    """``cameo-corr selfcheck`` on a CPU: every check that applies runs and passes, the others are
    listed as skipped with a reason, exit code 0."""
    out, workdir = tmp_path / "rows.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "cameo_corr.cli", "selfcheck", "--device", "cpu", "--json", str(out),
                           "--workdir", str(workdir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["check", "device", "result", "time", "tolerance"]
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    for name in ("matching kdtree", "matching torch", "matching faiss", "ray job depth+match (gpus_per_worker=0)"):
        assert rows[name]["status"] == "ok" and rows[name]["device"] == "cpu", rows[name]
    trainer = [r for name, r in rows.items() if name.startswith("trainer") and "official_bf16" not in name]
    assert len(trainer) == 1 and trainer[0]["status"] == "ok" and "fp32" in trainer[0]["check"]
    for name in ("supervised layer dense", "supervised layer chunked"):
        assert rows[name]["status"] == "skip" and "CUDA" in rows[name]["result"]
    vggt = [r for name, r in rows.items() if name.startswith("vggt")]
    assert vggt and all(r["status"] in ("ok", "skip") for r in vggt)
    assert all(f"{r['status']}: {r['result']}" in proc.stdout for r in rows.values())
    assert lines[-1].endswith(" s") and " failed" in lines[-1] and "0 failed" in lines[-1]
    assert {name for name, _ in CHECKS} == {"matching", "vggt", "ray job", "trainer", "trainer official_bf16", "supervised layer"}
    assert [r["status"] for name, r in rows.items() if name.startswith("trainer official_bf16")] == ["skip"]
    # the CUDA-vs-CPU cache comparison of a GPU run, here on the CPU cache against itself
    assert selfcheck.compare_caches(workdir / "cache-cpu", workdir / "cache-cpu") == (1.0, 1.0, [])


def test_dense_and_chunked_layer_rows_from_one_measurement() -> None:
    result = {
        "dense": {"peak_bytes": 6.0 * 2**30, "seconds": 0.2, "loss": 8.3},
        "chunked": {"peak_bytes": 1.0 * 2**30, "seconds": 0.25, "loss": 8.3},
        "memory_ratio": 6.0, "time_ratio": 1.25, "grad_max_rel_diff": 1e-6,
    }
    dense, chunked = selfcheck.comparison_rows(result, "cuda:0", "SD2.1 layer 10")
    assert (dense.status, chunked.status) == ("ok", "ok")
    assert "peak 6.00 GiB, 200 ms/step" in dense.result and "peak 1.00 GiB (6.0x less)" in chunked.result
    result["grad_max_rel_diff"] = 0.5
    assert selfcheck.comparison_rows(result, "cuda:0", "")[1].status == "FAIL"
    result["grad_max_rel_diff"], result["chunked"]["loss"] = 0.0, math.nan
    assert selfcheck.comparison_rows(result, "cuda:0", "")[1].status == "FAIL"


def test_the_trainer_checks_get_the_gpu_cache_when_the_cpu_reference_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the Ray check runs the job on the GPU, then on the CPU as a reference; a reference run that
    raises fails the check and still leaves the GPU run's cache to the trainer checks. (CUDA simulated: the
    first run is a real CPU run whose actors report cuda:0.)"""
    import cameo_corr.job.driver as driver

    real = driver.run_preprocess
    runs = []

    def gpu_then_failing_cpu(**options):
        runs.append(options)
        if len(runs) == 2:
            raise RuntimeError("numba cannot be imported")
        summary = real(**{**options, **preprocess_options(CPU)})
        return {**summary, "devices_used": ["cuda:0"]}

    monkeypatch.setattr(driver, "run_preprocess", gpu_then_failing_cpu)
    monkeypatch.setattr(selfcheck, "_synchronize", lambda device: None)
    ctx = Context(CUDA, tmp_path)
    with pytest.raises(RuntimeError, match="numba"):  # run_selfcheck makes it the check's FAIL row
        selfcheck.check_ray_job(ctx)
    assert len(runs) == 2 and ctx.cache == tmp_path / "cache-cuda"
