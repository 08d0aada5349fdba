"""DDP: `torchrun --standalone --nproc_per_node=2` trains on CPU (gloo); the ranks' weights stay
identical, only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[3]

_SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from relevance.training.checkpoint import trainable_state
from relevance.training.loop import TrainConfig, train
result = train(TrainConfig.from_dict(json.loads(sys.argv[1])))
save_file(trainable_state(result.model), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
"""


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    from relevance.data.demo_data import write_demo_data
    from relevance.data.ingest import ingest
    from relevance.model.tiny import build_tiny_model
    from relevance.training.loop import TrainConfig

    write_demo_data(tmp_path / "raw", "de,fr", rows_per_market=200, seed=5)
    ingest(str(tmp_path / "raw"), tmp_path / "ds", progress=False)
    build_tiny_model(tmp_path / "tiny", hidden=32, layers=1, heads=2)
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    config = TrainConfig(data=str(tmp_path / "ds"), method="mtl-lora", base_model=str(tmp_path / "tiny"),
                         out=str(out), max_steps=6, eval_every=3, batch_size=8, learning_rate=5e-3,
                         adapter_dropout=0.1, track=False, progress=False)
    script = tmp_path / "ddp_train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         json.dumps(config.to_dict()), str(dump)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    assert any(float(v.abs().sum()) > 0 for k, v in rank0.items() if "lora_B" in k), "training moved nothing"
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], rank0[k]) for k in saved)  # the best step is the last here or earlier
    info = json.loads((out / "run_info.json").read_text())
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    assert state["world_size"] == 2 and state["progress"]["examples_seen"] == 6 * 8 * 2
    assert info["markets"] == ["de", "fr"]
    assert not list(out.glob("**/*rank1*")), "only rank 0 writes the run directory"
