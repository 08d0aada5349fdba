"""The run directory on disk: checkpoints (what a resumed run needs to end bit-for-bit where an
uninterrupted one would), the run-directory checks, and the final outputs.

A checkpoint ``RUN/checkpoints/step-00000120/`` holds

- ``trainable.safetensors``: every parameter with ``requires_grad`` (adapters and the trained head);
  the frozen base is reloaded from the base model, so it is not copied;
- ``optimizer.pt``: optimizer and LR-scheduler ``state_dict`` (plain tensors, numbers, lists), read
  back with ``torch.load(weights_only=True)``, so a checkpoint can never execute code;
- ``rng.pt``: the torch CPU (and CUDA) generator state of every rank (dropout masks);
- ``state.json``: step, sampler position, best metric and step, patience counter, elapsed time,
  examples seen, MLflow run id, evaluation history, the divergence guard's rollbacks.

It is written into a hidden temporary directory and renamed into place, so a SIGKILL at any moment
leaves either the previous checkpoints or the complete new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "step-"


@dataclass
class Progress:
    """Loop state saved in every checkpoint's ``state.json``."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped: bool = False
    train_time_s: float = 0.0
    step_time_s: float = 0.0
    examples_seen: int = 0
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # relevance.training.divergence


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters being trained, by name."""
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's trainable parameters; any mismatch is an error naming it."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(value.to(device=own[name].device, dtype=own[name].dtype))


def rng_state() -> dict[str, Any]:
    """This process's torch generator states (CPU, and every CUDA device when present)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng_states: list[dict[str, Any]],
    state: Mapping[str, Any],
    best: Mapping[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically (with the best weights so far), keep the newest ``keep``."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(state), indent=1, sort_keys=True))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporary(run_dir: str | Path) -> None:
    """Remove leftovers of a checkpoint write interrupted by a kill."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``path``.

    Returns ``(state.json, best weights or None)``.
    """
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")), str(path))
    opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rngs = torch.load(path / "rng.pt", weights_only=True)
    if rank >= len(rngs):
        raise ValueError(f"{path} holds RNG state for {len(rngs)} process(es), this is rank {rank}")
    set_rng_state(rngs[rank])
    best_file = path / "best.safetensors"
    best = load_file(str(best_file)) if best_file.is_file() else None
    return json.loads((path / "state.json").read_text()), best


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: set[str]) -> dict[str, tuple]:
    """``{field: (saved, current)}`` for every field that differs, ``ignore`` aside."""
    keys = (set(saved) | set(current)) - ignore
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}


# -- the run directory around the checkpoints ----------------------------------------------------

def with_saved_field(config: Any, out: Path, name: str) -> Any:
    """``config`` with field ``name`` as ``out``'s saved ``train_config.json`` holds it, when it holds a value: a
    run made before that field's default changed resumes as it was made, not with the new default."""
    saved_path = out / "train_config.json"
    value = json.loads(saved_path.read_text()).get(name) if saved_path.is_file() else None
    return config if value is None else replace(config, **{name: value})


def check_run_dir(out: Path, config: Mapping[str, Any], resume: bool, ignore: set[str]) -> bool:
    """Validate ``out`` for a new run or a resumption; return True when resuming an existing run.

    A new run needs ``out`` absent or empty. ``resume`` needs the saved ``train_config.json`` to
    match ``config`` in every field but ``ignore``; otherwise the error lists each differing field.
    """
    saved_path = out / "train_config.json"
    if saved_path.is_file():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a training run: pass --resume to continue it, or choose a new --out"
            )
        diff = config_differences(json.loads(saved_path.read_text()), config, ignore)
        if diff:
            detail = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume {out}: it was made with other hyper-parameters ({detail}). Resume with "
                "the run's settings (see its train_config.json) or start a new --out"
            )
        return True
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no training run: choose a new --out")
    return False


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON aside and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Swap directory ``src`` into ``dst`` (the old ``dst`` is removed after the rename)."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_best_adapter(model: nn.Module, out: Path, base_model: str) -> None:
    """``RUN/adapter/`` = ``save_adapter`` of the model's current weights, swapped in atomically."""
    from relevance.model.adapters import save_adapter

    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, base_model)
    replace_dir(tmp, out / "adapter")


def write_run_outputs(out: Path, model: nn.Module, base_model: str, predictions: Mapping[str, Any],
                      run_info: Mapping[str, Any]) -> None:
    """The end of a run: best adapter, ``predictions/<split>.parquet``, then ``run_info.json`` last
    (its presence means the run directory is complete)."""
    save_best_adapter(model, out, base_model)
    folder = out / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    for split, frame in predictions.items():
        tmp = folder / f".{split}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, folder / f"{split}.parquet")
    write_json(out / "run_info.json", run_info)
