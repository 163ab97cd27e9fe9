"""Two gloo processes under torchrun: rank-disjoint batches, all-reduced gradients, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from medgan import checkpoint

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from train_helpers import RecordingTracker, tiny_config
    from medgan.train.loop import train
    cfg = tiny_config(total_kimg=0.064)
    cfg.train.log_every_kimg = 0.032
    rec = RecordingTracker()  # every rank's CLI builds one; the loop starts and feeds it on rank 0 only
    r = train(cfg, Path(sys.argv[1]), out_dir=Path(sys.argv[2]), resume=None, preset="ddp", tracker=rec)
    rank = os.environ["RANK"]
    out = dict(rank=rank, images=r.images_seen, metrics=r.metrics, run_dir=str(r.run_dir), env=r.env,
               ckpt=str(r.checkpoint), tracked=hasattr(rec, "started") and len(rec.metrics) > 0)
    Path(sys.argv[2], f"rank{{rank}}.json").write_text(json.dumps(out))
    """
)


def test_two_process_gloo(halves, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
    proc = subprocess.run([*cmd, str(halves), str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["images"] == r1["images"] == 64
    assert "DDP 2 x gloo" in r0["env"]
    # Health metrics are all-reduced, so every rank sees (and would act on) the same numbers.
    assert r0["metrics"]["loss/d"] == r1["metrics"]["loss/d"]
    assert r0["tracked"] and not r1["tracked"]  # rank 0 alone tracks
    # Only rank 0 wrote: one run folder with the checkpoints of a 64-image run.
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert run_dir.name == Path(r0["run_dir"]).name == Path(r1["run_dir"]).name
    assert sorted(p.name for p in run_dir.glob("ckpt-*.pt")) == ["ckpt-000000032.pt", "ckpt-000000064.pt"]
    state = checkpoint.load(run_dir / "ckpt-000000064.pt")
    assert state["images_seen"] == 64 and all(torch.isfinite(v).all() for v in state["G"].values())
