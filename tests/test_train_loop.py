"""The training loop on a tiny real cache: exact resume, lambda = 0, grid checks, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cameo_corr.schemas import SchemaError
from cameo_corr.train.config import load_config, preset_path
from cameo_corr.train.data import CorrStreamDataset
from cameo_corr.train.loop import checkpoint_dirs, read_metrics, train

REPO = Path(__file__).resolve().parents[1]
TINY = preset_path("tiny_cpu")
BASE = ["data.num_views=3", "data.batch_size=2", "data.shuffle_buffer=3", "train.log_every=1"]


@pytest.fixture(scope="module")
def cache(tiny_train_cache: Path) -> Path:
    return tiny_train_cache


def config(cache: Path, *overrides: str):
    return load_config(TINY, [f"data.cache={cache}", *BASE, *overrides])


def model_state(run: Path) -> dict[str, torch.Tensor]:
    last = checkpoint_dirs(run)[-1]
    return load_file(str(last / "model.safetensors"))


@pytest.mark.slow
def test_resume_is_exact(cache: Path, tmp_path: Path) -> None:
    """N steps straight == N/2 steps, a new process-like Trainer resuming, N/2 more (with grad accumulation);
    N = 2 keeps it short (a step costs seconds on a CPU) and still resumes across an epoch's end."""
    cfg = config(cache, "train.max_steps=2", "train.checkpoint_every=1", "train.gradient_accumulation_steps=2")
    straight = train(cfg, tmp_path / "a", resume="never")
    assert straight.step == 2 and len(straight.history) == 2
    half = train(cfg, tmp_path / "b", resume="never", max_steps=1)
    assert half.step == 1 and [p.rsplit("-", 1)[-1] for p in half.checkpoints] == ["00000001"]
    rest = train(cfg, tmp_path / "b", resume="auto")
    assert rest.step == 2 and [r["step"] for r in rest.history] == [2]

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for k in ("loss", "diffusion", "cameo", "precision", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    sa, sb = model_state(tmp_path / "a"), model_state(tmp_path / "b")
    assert sa.keys() == sb.keys() and any(k.startswith("head_mlp.") for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
    # the data position was checkpointed: 2 steps x 2 micro-batches x 2 samples over 6 windows (the resumed
    # step read past the end of epoch 0)
    state = json.loads((checkpoint_dirs(tmp_path / "b")[-1] / "loop_state.json").read_text())
    assert state == {"step": 2, "world_size": 1, "precision": "fp32",
                     "ranks": [{"data": {"epoch": 8 // 6, "position": 8 % 6}, "corrupt_skipped": 0}]}
    # the parameters moved
    fresh = train(config(cache, "train.max_steps=1", "optim.lr=0"), tmp_path / "c", resume="never")
    assert fresh.step == 1
    sc = model_state(tmp_path / "c")
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k in sc)


@pytest.mark.slow
def test_baseline_without_cameo_loss_logs_precision(cache: Path, tmp_path: Path) -> None:
    cfg = config(cache, "train.max_steps=2", "loss.cameo_weight=0", "train.tensorboard=true", "eval.every=2", "eval.batches=1")
    result = train(cfg, tmp_path / "run", resume="never")
    assert result.step == 2
    for row in result.history:
        assert math.isnan(row["cameo"]) and math.isfinite(row["diffusion"]) and 0.0 <= row["precision"] <= 1.0
    assert result.evals and 0.0 <= result.evals[-1]["eval_precision"] <= 1.0
    assert not any(k.startswith("head_mlp.") for k in model_state(tmp_path / "run"))
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_supervised_layer_must_match_the_cache_grid(cache: Path, tmp_path: Path) -> None:
    cfg = config(cache, "model.layer=up_blocks.0.attentions.0")  # 4x4 tokens, the cache has 8x8
    with pytest.raises(SchemaError, match="cache stores grid 8x8"):
        train(cfg, tmp_path / "run", resume="never")


def test_resume_never_refuses_a_used_directory(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000001" / "loop_state.json").write_text("{}")
    with pytest.raises(SchemaError, match="already has checkpoints"):
        train(config(cache), tmp_path / "run", resume="never")


@pytest.mark.slow
def test_cli_trains_checkpoints_and_resumes(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command trains and checkpoints in a subprocess of its own; the resume runs the same command in
    this process (one interpreter start-up less)."""
    from cameo_corr.cli import main

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["train", "--cache", str(cache), "--config", str(TINY), "--out", str(out)]

    def cli(*extra: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "cameo_corr.cli", *args, *extra, *BASE], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def in_process(*extra: str) -> dict:
        assert main([*args, *extra, *BASE]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = cli("--max-steps", "2", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    assert first["step"] == 2 and first["checkpoint"].endswith("step-00000002")
    ckpts = checkpoint_dirs(out)
    assert [p.name for p in ckpts] == ["step-00000002"]  # older ones pruned
    files = {p.name for p in ckpts[0].iterdir()}
    assert {"model.safetensors", "optimizer.bin", "loop_state.json"} <= files
    second = in_process("--max-steps", "3")
    assert second["step"] == 3 and math.isfinite(second["cameo"]) and math.isfinite(second["diffusion"])
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "config.yaml").is_file()


@pytest.mark.slow
def test_corrupt_chunk_is_one_line_and_skipped_windows_reach_the_metrics(cache: Path, tmp_path: Path) -> None:
    """data.on_corrupt=raise: one error line naming the shard, exit 2, with or without DataLoader workers,
    last on stderr (after the progress bar's), and no asyncio "Task was destroyed" lines at exit. skip: every metrics row counts the windows
    skipped so far, the count survives a resume, and a stream of nothing but corrupt windows stops."""
    import shutil

    from test_train_data import _corrupt_first_shard

    src = tmp_path / "cache"
    shutil.copytree(cache, src)
    bad = _corrupt_first_shard(src)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cameo_corr.cli", "train", "--cache", str(src), "--config", str(TINY), "--out",
                               str(tmp_path / f"raise{workers}"), "--max-steps", "4", *(["--no-progress"] if workers == 0 else []),
                               *BASE, f"data.num_workers={workers}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for workers in (0, 1)]  # both at once: each is a fresh interpreter (this keeps the suite short)
    try:
        errs = [proc.communicate(timeout=300)[1] for proc in procs]
    finally:
        for proc in procs:  # a timed-out one is not left running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, err in zip(procs, errs):
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err and "Task was destroyed" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("cameo-corr train: error: ")]
        assert len(lines) == 1 and "corrupt data" in lines[0] and any(f"window {w}" in lines[0] for w in bad), err
        assert re.split(r"[\r\n]+", err.strip())[-1] == lines[0], err  # the progress bar (workers=1) ends before the error

    cfg = config(src, "data.on_corrupt=skip", "train.max_steps=4", "train.checkpoint_every=2")
    straight = train(cfg, tmp_path / "a", resume="never")
    counts = [r["corrupt_skipped"] for r in read_metrics(tmp_path / "a")]
    # the corrupt windows among the stream positions read (the checkpointed position counts kept and skipped ones)
    from cameo_corr.train.loop import make_loader

    data = json.loads((checkpoint_dirs(tmp_path / "a")[-1] / "loop_state.json").read_text())["ranks"][0]["data"]
    dataset = make_loader(cfg, rank=0, world_size=1).dataset
    read = [dataset.window_meta(w)["window_id"] for _, _, w, _ in itertools.islice(dataset._positions(), data["epoch"] * 6 + data["position"])]
    assert counts == sorted(counts) and counts[-1] == sum(w in bad for w in read) > 0
    assert straight.history[-1]["corrupt_skipped"] == counts[-1]
    train(cfg, tmp_path / "b", resume="never", max_steps=2)
    train(cfg, tmp_path / "b", resume="auto")
    assert [r["corrupt_skipped"] for r in read_metrics(tmp_path / "b")] == counts

    everything = tmp_path / "all_bad"
    shutil.copytree(cache, everything)
    from test_cache import _flip_chunk_byte

    from cameo_corr.cache.layout import shard_dir
    from cameo_corr.cache.reader import CorrCache

    for shard in set(CorrCache(everything).manifest("ok", columns=["shard"]).column("shard").to_pylist()):
        _flip_chunk_byte(everything / shard_dir(shard), "nn")
    with pytest.raises(Exception, match="the last 6 windows read were all corrupt, a whole epoch"):
        train(config(everything, "data.on_corrupt=skip", "train.max_steps=1"), tmp_path / "c", resume="never")


def test_cli_reports_config_errors_naming_the_key(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cameo_corr.cli import main

    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "x"), "data.num_views=two"]) == 2
    assert "data.num_views" in capsys.readouterr().err
    assert main(["train", "--cache", str(cache), "--out", str(tmp_path / "x"), "--config", "tiny_cpu", "loss.typo=1"]) == 2
    assert "loss.typo" in capsys.readouterr().err


def test_presets_load_by_name_and_unknown_names_are_errors(tmp_path: Path) -> None:
    tiny = load_config("tiny_cpu")
    assert (tiny.data.resolution, tiny.model.layer) == (64, "up_blocks.1.attentions.0")
    sd21 = load_config("sd21_cameo", ["train.max_steps=7"])
    assert (sd21.model.layer, sd21.loss.query_chunk, sd21.train.max_steps) == (10, 256, 7)
    assert (sd21.loss.mode, sd21.data.order, sd21.data.shuffle_prob) == ("official", "mixed", 0.5)
    assert (sd21.data.order_scope, sd21.train.precision, sd21.loss.skipped_grad) == ("batch", "fp32", "none")
    for bad in ("loss.mode=global", "data.order=random", "data.shuffle_prob=1.5", "data.order_scope=step",
                "train.precision=bf16", "loss.skipped_grad=never"):
        with pytest.raises(SchemaError, match=bad.split("=")[0]):
            load_config("tiny_cpu", [bad])
    with pytest.raises(SchemaError, match="train.precision.*set train.mixed_precision=bf16"):
        load_config("tiny_cpu", ["train.precision=official_bf16"])
    assert load_config("tiny_cpu", ["train.precision=official_bf16", "train.mixed_precision=bf16"]).train.precision == "official_bf16"
    with pytest.raises(SchemaError, match="no built-in config 'nope'"):
        preset_path("nope")
    with pytest.raises(SchemaError, match="loss.query_chunk"):
        load_config("tiny_cpu", ["loss.query_chunk=0"])
    # chunked by default (a custom config at SD2.1 size must not form the full logits); null: dense at any size
    assert tiny.loss.query_chunk == 256 and load_config("tiny_cpu", ["loss.query_chunk=null"]).loss.query_chunk is None


def test_checkpoint_is_marked_finished_only_after_every_rank_saved(cache: Path, tmp_path: Path) -> None:
    """``loop_state.json`` marks a checkpoint finished (and lets older ones be pruned), so on multi-GPU it
    must be written after a barrier that follows every rank's ``save_state`` (each rank writes its own
    RNG state file); the barrier calls are recorded with what was on disk at that moment."""
    from cameo_corr.train.loop import Trainer

    trainer = Trainer(config(cache), tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "step-00000000"
    seen: list[tuple[bool, bool]] = []
    barrier = trainer.accelerator.wait_for_everyone
    trainer.accelerator.wait_for_everyone = lambda: (  # type: ignore[method-assign]
        seen.append(((path / "random_states_0.pkl").is_file(), (path / "loop_state.json").is_file())), barrier())[1]
    assert trainer.save() == path
    assert (True, False) in seen, seen  # a barrier after this rank's state was written, before the marker
    assert (path / "loop_state.json").is_file()


def test_keep_checkpoints_must_be_positive_or_null() -> None:
    for bad in ("0", "-1"):  # [:-0] would silently keep every checkpoint, [:-(-1)] delete the oldest only
        with pytest.raises(SchemaError, match="train.keep_checkpoints"):
            load_config("tiny_cpu", [f"train.keep_checkpoints={bad}"])
    assert load_config("tiny_cpu", ["train.keep_checkpoints=null"]).train.keep_checkpoints is None


@pytest.mark.slow
def test_codec_saved_only_when_its_weights_exist_nowhere_else(cache: Path, tmp_path: Path) -> None:
    """The tiny random VAE goes into checkpoints (and resumes); the identity codec adds nothing."""
    tiny = config(cache, "train.max_steps=2", "train.checkpoint_every=1", "model.vae=tiny")
    train(tiny, tmp_path / "tiny", resume="never", max_steps=1)
    assert train(tiny, tmp_path / "tiny", resume="auto").step == 2
    ident = config(cache, "train.max_steps=1")
    train(ident, tmp_path / "ident", resume="never")
    custom = [sorted(p.name for p in checkpoint_dirs(tmp_path / run)[-1].glob("custom_checkpoint_*")) for run in ("tiny", "ident")]
    assert len(custom[0]) == len(custom[1]) + 1


def test_resuming_with_another_process_count_warns() -> None:
    from cameo_corr.train.loop import LoopState

    saved = LoopState(step=7, world_size=2).state_dict()
    with pytest.warns(UserWarning, match="written by 2 processes and is resumed by 1"):
        LoopState(world_size=1).load_state_dict(saved)
    same = LoopState(world_size=2)
    same.load_state_dict(saved)
    assert same.step == 7


class _Stream:
    """The two things :class:`LoopState` keeps of a rank's data loader: its position and skipped count."""

    def __init__(self, position: int = 0, corrupt_skipped: int = 0) -> None:
        self.position, self.corrupt_skipped = position, corrupt_skipped

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def test_each_rank_resumes_its_own_stream() -> None:
    """The checkpoint holds every rank's stream (gathered before accelerate saves the loop state from the main
    process): each rank resumes its own position and skipped count; with another process count the
    positions cannot carry over and the skipped total stays on rank 0 (so the metric's sum is unchanged);
    a checkpoint from before per-rank streams (the main process's only) gives every rank its position and
    rank 0 its skipped count."""
    from cameo_corr.train.loop import LoopState

    saving = LoopState(step=3, world_size=2, loader=_Stream(5, 1))
    saving.ranks = [saving.stream(), LoopState(loader=_Stream(7, 4)).stream()]
    saved = saving.state_dict()
    assert saved["ranks"] == [{"data": {"epoch": 0, "position": 5}, "corrupt_skipped": 1},
                              {"data": {"epoch": 0, "position": 7}, "corrupt_skipped": 4}]
    resumed = [LoopState(world_size=2, rank=r, loader=_Stream()) for r in (0, 1)]
    for state in resumed:
        state.load_state_dict(saved)
    assert [(s.step, s.loader.position, s.loader.corrupt_skipped) for s in resumed] == [(3, 5, 1), (3, 7, 4)]
    with pytest.warns(UserWarning, match="written by 2 processes and is resumed by 3"):
        other = [LoopState(world_size=3, rank=r, loader=_Stream()) for r in range(3)]
        for state in other:
            state.load_state_dict(saved)
    assert [(s.loader.position, s.loader.corrupt_skipped) for s in other] == [(5, 5), (7, 0), (7, 0)]
    old = {"step": 2, "world_size": 2, "precision": "fp32", "data": {"epoch": 0, "position": 4}, "corrupt_skipped": 2}
    for r in (0, 1):
        state = LoopState(world_size=2, rank=r, loader=_Stream())
        state.load_state_dict(old)
        assert (state.step, state.loader.position, state.loader.corrupt_skipped) == (2, 4, 2 if r == 0 else 0)


OFFICIAL_RECIPE = [
    "model.qk_norm=true", "model.no_text_cross_attn=true", "model.frame_local_width=64", "model.cond_encoder=pixel",
    "model.domain_dict={re10k: 0, co3d: 1, others: 2}", "model.camera_norm=official", "model.ref_timestep=sample",
    "model.cond_dropout_scope=batch", "diffusion.beta_schedule=snr_rescale", "diffusion.snr_rescale=4",
    "diffusion.rescale_betas_zero_snr=true", "optim.lr_scheduler=constant_with_warmup", "optim.warmup_steps=4",
]


@pytest.mark.slow
def test_official_recipe_trains_with_adamw_warmup_and_clipping(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The official model recipe on the tiny model, end to end: AdamW settings, linear warm-up of the
    constant_with_warmup schedule, gradient clipping at max_grad_norm every optimizer step."""
    from accelerate import Accelerator

    from cameo_corr.train.loop import Trainer

    clips: list[float] = []
    clip = Accelerator.clip_grad_norm_

    def spy(self: Accelerator, parameters, max_norm: float, norm_type: int = 2):
        clips.append(max_norm)
        return clip(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    cfg = config(cache, "train.max_steps=2", *OFFICIAL_RECIPE)
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, tmp_path / "run")
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert {(g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups} == {(0.01, (0.9, 0.999), 1e-8)}
    result = trainer.run()
    assert [r["lr"] for r in result.history] == pytest.approx([cfg.optim.lr / 4, cfg.optim.lr / 2])  # 1/4, 2/4 of warm-up
    assert clips == [1.0, 1.0]
    for row in result.history:
        assert all(math.isfinite(row[k]) for k in ("loss", "diffusion", "cameo"))
    state = model_state(tmp_path / "run")
    assert "model.unet.class_embedding.weight" in state and "model.unet.conv_in.cond.out.weight" in state
    assert any(k.endswith("attn1.norm_q.weight") for k in state)
    assert not any(".attn2." in k or "null_embedding" in k for k in state)


@pytest.mark.slow
def test_trains_on_a_mixture_of_caches_and_resumes_it(cache: Path, tmp_path: Path) -> None:
    """``data.caches`` end to end through the trainer: two caches with weights and tags, 2 steps, then a
    resumed third step whose data position continues the mixture's epoch."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(cache, other)
    caches = json.dumps([{"path": str(cache), "weight": 3, "tag": "re10k"}, {"path": str(other), "weight": 1, "tag": "co3d"}])
    cfg = load_config(TINY, [*BASE, f"data.caches={caches}", "train.max_steps=3", "train.checkpoint_every=2"])
    first = train(cfg, tmp_path / "run", resume="never", max_steps=2)
    assert first.step == 2 and all(math.isfinite(r["cameo"]) and math.isfinite(r["diffusion"]) for r in first.history)
    rest = train(cfg, tmp_path / "run", resume="auto")
    assert rest.step == 3 and [r["step"] for r in rest.history] == [3]
    state = json.loads((checkpoint_dirs(tmp_path / "run")[-1] / "loop_state.json").read_text())
    # 3 steps x 2 samples over an epoch of 12 windows (6 per cache)
    assert state["ranks"][0]["data"] == {"epoch": 0, "position": 6}


# ------------------------------------------------------------------------- skipped steps and NaN
def _snapshot(trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Head MLP weights, UNet weights and the optimizer state of the head's (optimizer-side) parameters."""
    head = {n: p.detach().clone() for n, p in trainer.head_mlp.named_parameters()}
    unet = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.trainable).model.named_parameters()}
    opt = trainer.optimizer.optimizer
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(trainer.head_params) if p in opt.state}
    return head, unet, state


def _no_cameo_rows(batch: dict) -> dict:
    """The batch with no supervised entry: the official reference- and target-query selections are empty."""
    return {**batch, "corr_mask": torch.zeros_like(batch["corr_mask"])}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "official_bf16"])
def test_a_step_without_cameo_term_gives_the_head_mlp_no_gradient(cache: Path, tmp_path: Path, precision: str,
                                                                   fresh_accelerate_state: None) -> None:
    """``loss.skipped_grad: none``: a step whose CAMEO term is skipped leaves the head MLP and its AdamW state
    exactly as they were (no weight decay, no momentum) while the UNet trains on the diffusion loss;
    ``zero`` gives it a zero gradient, so AdamW decays it and moves its moments."""
    from cameo_corr.train.loop import Trainer

    extra = ["train.precision=official_bf16", "train.mixed_precision=bf16"] if precision == "official_bf16" else []
    moved = {}
    for rule in ("none", "zero"):
        trainer = Trainer(config(cache, f"loss.skipped_grad={rule}", *extra), tmp_path / rule)
        stream = trainer.batches()
        first = trainer.micro_step(next(stream))  # a normal step: the head has gradients and AdamW moments
        assert first["synced"] and first["cameo_applied"] and math.isfinite(float(first["cameo"]))
        head, unet, state = _snapshot(trainer)
        assert len(state) == len(trainer.head_params)
        m = trainer.micro_step(_no_cameo_rows(next(stream)))
        assert m["synced"] and not m["cameo_applied"] and not m["cameo_nan"] and math.isnan(float(m["cameo"]))
        head2, unet2, state2 = _snapshot(trainer)
        assert any(not torch.equal(unet[k], unet2[k]) for k in unet)  # the diffusion loss trained the UNet
        same = all(torch.equal(head[k], head2[k]) for k in head) and all(
            torch.equal(state[i][k], state2[i][k]) for i in state for k in state[i])
        moved[rule] = not same
        if precision == "official_bf16":
            assert all(p.dtype == torch.bfloat16 for p in trainer.head_mlp.parameters())
            assert all(torch.equal(p.detach(), m_.detach().to(torch.bfloat16))
                       for p, m_ in zip(trainer.head_mlp.parameters(), trainer.head_params))
    assert moved == {"none": False, "zero": True}


def test_a_nan_total_loss_stops_naming_the_step_and_the_windows(cache: Path, tmp_path: Path) -> None:
    from cameo_corr.cli import RunFailed
    from cameo_corr.train.loop import NonFiniteLoss, Trainer

    trainer = Trainer(config(cache), tmp_path / "run")
    batch = next(trainer.batches())
    batch = {**batch, "image": batch["image"].clone()}
    batch["image"][0, -1, 0, 0, 0] = float("nan")  # a target view's pixel: its latents, hence the diffusion loss
    before = _snapshot(trainer)[1]
    with pytest.raises(NonFiniteLoss) as err:
        trainer.micro_step(batch)
    message = str(err.value)
    assert isinstance(err.value, RunFailed) and "non-finite training loss nan at step 1 (rank 0, micro-batch 0)" in message
    assert all(w in message for w in batch["window_id"]) and "diffusion nan" in message
    after = _snapshot(trainer)[1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step was taken


def test_a_nan_cameo_term_is_skipped_with_a_warning(cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A NaN CAMEO term (here from a head MLP whose weights went NaN) is left out like the official code's
    skip: the step trains the UNet on the diffusion loss, the head gets no gradient, the warning names the
    step and the window ids."""
    from cameo_corr.train.loop import Trainer

    trainer = Trainer(config(cache), tmp_path / "run")
    with torch.no_grad():
        trainer.head_mlp.net[2].bias.fill_(float("nan"))
    batch = next(trainer.batches())
    head, unet, _ = _snapshot(trainer)
    with caplog.at_level("WARNING", logger="cameo_corr.train.loop"):
        m = trainer.micro_step(batch)
    assert m["cameo_nan"] and not m["cameo_applied"] and math.isfinite(float(m["loss"].detach()))
    assert float(m["loss"].detach()) == float(m["diffusion"])
    text = caplog.text
    assert "the CAMEO loss is NaN at step 1 (rank 0, micro-batch 0)" in text and all(w in text for w in batch["window_id"])
    head2, unet2, _ = _snapshot(trainer)
    assert all(torch.equal(head[k].isnan(), head2[k].isnan()) and torch.equal(head[k].nan_to_num(), head2[k].nan_to_num())
               for k in head)
    assert not any(p in trainer.optimizer.optimizer.state for p in trainer.head_params)  # AdamW never stepped the head
    assert any(not torch.equal(unet[k], unet2[k]) for k in unet)


def run_two_ranks(script: str, *args: str) -> subprocess.CompletedProcess:
    """``tests/<script> args...`` on two CPU processes (gloo) through ``torch.distributed.run``; both must exit 0."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "tests" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ddp_ranks_share_the_batch_order_and_the_skip_rule(cache: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo) through ``torch.distributed.run``: each rank trains on its own windows with
    the reference count of the single-process batch at that step; a step where only rank 0 has no CAMEO
    term still updates the head MLP on both ranks (DDP averages rank 1's gradient with rank 0's zero), a
    step where no rank has one leaves it untouched on both, and the UNet stays identical across ranks. A
    checkpoint gives each rank back its own stream, and evaluation means count every rank's batches."""
    run_two_ranks("ddp_skip_worker.py", str(cache), str(tmp_path))
    out0, out1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    r0, r1 = out0["steps"], out1["steps"]
    single = CorrStreamDataset(str(cache), num_views=3, resolution=64, batch_size=2)
    for step, (a, b) in enumerate(zip(r0, r1)):
        assert a["num_ref"] == b["num_ref"] == [single.batch_order(2 * step)[0]] * 2
        assert a["windows"] != b["windows"] and a["unet_sum"] == b["unet_sum"]
    assert not set(r0[0]["windows"]) & set(r1[0]["windows"])  # within an epoch the ranks' windows are disjoint
    assert [(a["applied"], b["applied"]) for a, b in zip(r0, r1)] == [(True, True), (False, True), (False, False)]
    assert [a["head_moved"] for a in r0] == [b["head_moved"] for b in r1] == [True, True, False]
    # each rank resumes its own stream from the checkpoint (accelerate saves the loop state from rank 0 only)
    assert out0["saved"] != out1["saved"]
    assert out0["resumed"] == out0["saved"] and out1["resumed"] == out1["saved"]
    # evaluation: means over both ranks' batches; rank 1's have no CAMEO term, which does not make the mean NaN
    own0, own1, both = out0["eval_own"], out1["eval_own"], out0["eval_both"]
    assert out1["eval_both"] == both and math.isnan(own1["eval_cameo"]) and math.isfinite(own0["eval_cameo"])
    assert both["eval_cameo"] == pytest.approx(own0["eval_cameo"], rel=1e-12)
    assert both["eval_diffusion"] == pytest.approx((own0["eval_diffusion"] + own1["eval_diffusion"]) / 2, rel=1e-12)


@pytest.mark.slow
def test_the_train_command_runs_on_two_processes(cache: Path, tmp_path: Path) -> None:
    """The documented multi-GPU command, ``accelerate launch -m cameo_corr.cli train``, here through
    ``torch.distributed.run`` with two CPU processes (gloo): both ranks train, evaluate and checkpoint, the
    checkpoint holds both ranks' streams, the main process writes the tensorboard logs and prints the one
    summary line, and each rank destroys its process group before exit (a gloo group left to interpreter
    shutdown can abort a process whose run succeeded)."""
    run = tmp_path / "run"
    proc = run_two_ranks("ddp_cli_rank.py", str(tmp_path), "train", "--cache", str(cache), "--config", "tiny_cpu", "--out", str(run),
                         "--max-steps", "2", "--no-progress", *BASE, "eval.every=2", "eval.batches=1",
                         f"eval.cache={json.dumps(str(cache))}", "train.tensorboard=true")
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["step"] for s in summaries] == [2]  # one summary line, from the main process
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [1, 2] and math.isfinite(rows[1]["eval_diffusion"])  # evaluated over both ranks
    writers = {f.name.split(".")[-2] for f in (run / "logs").rglob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1  # tensorboard from the main process only (the scalars and, beside them, the hparams)
    loop_state = json.loads((checkpoint_dirs(run)[-1] / "loop_state.json").read_text())
    assert loop_state["world_size"] == 2 and len(loop_state["ranks"]) == 2
    for r in (0, 1):
        assert json.loads((tmp_path / f"exit-rank{r}.json").read_text()) == {"process_group_up": False}


def test_a_training_command_reads_each_cache_json_once(cache: Path, tmp_path: Path, monkeypatch) -> None:
    """The train command's views check, the trainer's grid check, the training and evaluation streams and
    their DataLoader worker all use the cache.json read once at the start (it used to be read 4-5 times)."""
    from cameo_corr.cli import main
    from cameo_corr.schemas import CacheConfig

    log = tmp_path / "parsed.txt"  # a file: the forked DataLoader worker's parses count too
    log.touch()
    real = CacheConfig.from_json.__func__

    def counting(cls, text, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(cls, text, *args, **kwargs)

    monkeypatch.setattr(CacheConfig, "from_json", classmethod(counting))
    rc = main(["train", "--cache", str(cache), "--config", "tiny_cpu", "--out", str(tmp_path / "run"), "--max-steps", "1",
               "--no-progress", *BASE, "data.num_workers=1", "data.multiprocessing_context=fork", "eval.every=1",
               f"eval.cache={json.dumps(str(cache))}", "eval.batches=1"])
    assert rc == 0
    parsed = log.read_text().split()
    assert len(parsed) == 1, parsed
