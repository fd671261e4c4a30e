"""One rank of the two-process CPU (gloo) run of ``test_train_loop.test_ddp_ranks_share_the_batch_order_and_the_skip_rule``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_skip_worker.py CACHE OUT``. Three
optimizer steps: a normal one, one where only rank 0 has no CAMEO term, one where no rank has one. Each
rank writes ``OUT/rank<r>.json``: per step its batch's reference counts and window ids, whether its
CAMEO term was applied, whether the head MLP moved, and a checksum of the UNet weights. Then the ranks'
streams through a checkpoint (rank 1 reads one batch more; the ranks' skipped counts differ): each
rank's saved and resumed position and count. Then evaluation on two batches per rank, rank 1's without
a CAMEO term: each rank's own means and the means over both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cameo_corr.train.config import load_config, preset_path
from cameo_corr.train.loop import Trainer, end_process_group, evaluate


def main(cache: str, out: str) -> None:
    cfg = load_config(preset_path("tiny_cpu"), [f"data.cache={cache}", "data.num_views=3", "data.batch_size=2",
                                                "data.shuffle_buffer=3", "train.max_steps=3"])
    trainer = Trainer(cfg, Path(out) / "run")
    rank = trainer.accelerator.process_index
    stream = trainer.batches()
    rows = []
    for step, skip_ranks in enumerate(((), (0,), (0, 1))):
        batch = next(stream)
        if rank in skip_ranks:  # no supervised entry: the official selections are empty
            batch = {**batch, "corr_mask": torch.zeros_like(batch["corr_mask"])}
        head = [p.detach().clone() for p in trainer.head_mlp.parameters()]
        m = trainer.micro_step(batch)
        trainer.state.step += 1
        unet = trainer.accelerator.unwrap_model(trainer.trainable).model
        rows.append({
            "num_ref": batch["num_ref"].tolist(),
            "windows": list(batch["window_id"]),
            "applied": bool(m["cameo_applied"]),
            "head_moved": any(not torch.equal(a, p) for a, p in zip(head, trainer.head_mlp.parameters())),
            "unet_sum": float(sum(p.detach().double().sum() for p in unet.parameters())),
        })
    if rank == 1:
        next(stream)
    trainer.loader.corrupt_skipped = 10 + rank  # as if the ranks had skipped different corrupt windows
    saved = {"data": trainer.loader.state_dict(), "corrupt_skipped": trainer.loader.corrupt_skipped}
    path = trainer.save()
    again = Trainer(cfg, Path(out) / "run")
    again.load(path)
    resumed = {"data": again.loader.state_dict(), "corrupt_skipped": again.loader.corrupt_skipped}

    acc = trainer.accelerator
    batches = [next(stream) for _ in range(2)]
    if rank == 1:
        batches = [{**b, "corr_mask": torch.zeros_like(b["corr_mask"])} for b in batches]
    args = (trainer.trainable, trainer.head_mlp, trainer.codec, trainer.noise_scheduler, batches, cfg, trainer.grid, acc.device)
    own = evaluate(*args)
    both = evaluate(*args, reduce_sum=trainer.reduce_sum)
    result = {"steps": rows, "saved": saved, "resumed": resumed, "eval_own": own, "eval_both": both}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
