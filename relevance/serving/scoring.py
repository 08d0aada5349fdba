"""Batch scoring: every valid query–ad row of every market, scored by its market's registered model.

Output contract: :mod:`data_contracts.scores`. How the job keeps its promises:

- **Bounded memory.** Input is streamed in record batches of ``window`` rows; within a window each
  market's rows are tokenized one chunk ahead of the model (a producer thread), sorted by token length
  and cut into token-budget batches (``RelevanceModel.score_frame``), so padding wastes little
  compute; forwards run under ``torch.inference_mode``.
- **Bad rows never crash it.** Windows are validated against the scoring contract and rejected rows go
  to ``_quarantine/`` with rule and detail (:mod:`relevance.serving.scoring_input`).
- **Fail before writing.** Every input footer is opened and every market's model resolved before
  anything is written: a corrupt file is an error naming it, and ``DST`` is untouched.
- **One market without a model never stops the others.** Its valid rows are quarantined with rule
  ``market_no_model`` (the detail names ``models:/<prefix>-<market>@<alias>``) and the summary says
  ``status: "partial"`` and ``unscored_markets: {market: rows}``; callers must surface it (the CLI
  exits 3, the ``score`` flow ends Failed). ``require_all=True`` is the strict mode: such a market is
  an error naming it, before anything is written.
- **Atomic, resumable.** The output is built in the hidden sibling ``.DST.scoring`` and renamed over
  ``DST`` at the end. A finished input file's parts are renamed into place and then recorded in
  ``_manifest.json``; with ``resume``, a killed job skips recorded files and redoes the others from
  scratch, with the model versions it started with, so every input row lands exactly once.

The ``DST`` of a job must be a local path (it is renamed into place); the input may be any pyarrow
filesystem URI. The Spark engine (:mod:`relevance.serving.spark_scoring`) shares :class:`ScoringJob`
(:mod:`relevance.serving.scoring_job`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from relevance.model.precision import check_precision
from relevance.serving.registry import DEFAULT_PREFIX, load_local
from relevance.serving.scoring_input import PartWriters, ScoringError, process_file
from relevance.serving.scoring_job import COMPLETE, PARTIAL, MarketsWithoutModel, ScoringJob, scores_table

ENGINES = ("local", "spark")
__all__ = ["COMPLETE", "ENGINES", "PARTIAL", "MarketsWithoutModel", "ScoringError", "ScoringJob", "score_dataset",
           "score_local"]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="score", disable=not enabled, file=sys.stderr)


def score_local(source: str, output: str | os.PathLike, *, tracking_uri: str | None = None, alias: str = "champion",
                markets: Sequence[str] | None = None, resume: bool = False, require_all: bool = False,
                prefix: str = DEFAULT_PREFIX, batch_size: int = 64, window: int = 4096, precision: str = "auto",
                progress: bool = False, on_window: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The streaming engine in this process (module docstring); returns the summary.

    Without ``resume``, what an interrupted job left in the staging directory is discarded. Markets
    without a model are quarantined (``status: "partial"``) unless ``require_all`` makes them an error.
    ``on_window(n_rows)`` runs after every streamed window (progress hooks; tests kill the job there).
    ``precision``: ``auto`` scores a market in bf16 where the hardware has it and its version's fp32/bf16
    parity held (``RelevanceModel.resolve_precision``); ``fp32`` / ``bf16`` force it. The summary's
    ``precision`` says what each market used.
    """
    check_precision(precision)
    if window < 1 or batch_size < 1:
        raise ValueError(f"window={window} and batch_size={batch_size} must be positive integers")
    started, model_s = time.perf_counter(), 0.0
    job = ScoringJob(source, output, engine="local", alias=alias, markets=markets, require_all=require_all,
                     prefix=prefix, tracking_uri=tracking_uri, resume=resume)
    tmp = Path(tempfile.mkdtemp(prefix="ads-relevance-models-"))
    bar = _progress(job.total_rows(), progress)
    try:
        models = {m: load_local(p) for m, p in job.download_models(tmp).items()}
        used = {m: model.resolve_precision(precision) for m, model in sorted(models.items())}
        for m, model in models.items():
            model.model_for(used[m])  # a bf16 copy is made here, so that it counts as loading, not scoring
        load_s = time.perf_counter() - started
        selection = set(job.selection) if job.selection is not None else None
        for f in job.todo():
            writers = PartWriters(job.staging, f.index)

            def on_valid(market: str, rows: pd.DataFrame, writers: PartWriters = writers) -> int:
                nonlocal model_s
                t0 = time.perf_counter()
                values = models[market].score_frame(rows, batch_size=batch_size, precision=precision)
                model_s += time.perf_counter() - t0
                writers.write("scores", market, scores_table(rows, values, job.models[market]))
                return len(rows)

            def tick(n: int) -> None:
                bar.update(n)
                if on_window is not None:
                    on_window(n)

            try:
                counts = process_file(job.fs, f, writers, job.seen, set(models), selection, window, on_valid, tick,
                                      no_model_detail=job.no_model_detail)
            except BaseException:
                writers.abort()
                raise
            writers.commit()
            job.commit(f.index, counts)
        # where the time went: the registry (aliases, versions) and fetching and loading the models; the
        # models' own scoring (tokenize + forward); the rest (reading, the input contract, writing)
        total = time.perf_counter() - started
        timings = {"registry_and_models": load_s, "scoring": model_s, "read_check_write": total - load_s - model_s,
                   "total": total}
        return job.finish({"precision": used, "timings_s": {k: round(v, 3) for k, v in timings.items()}})
    finally:
        bar.close()
        job.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _translate_skip_unknown(kwargs: dict[str, Any]) -> None:
    """Map the deprecated ``skip_unknown`` onto ``require_all`` (its opposite), in place.

    Why kept: callers written when a missing model failed the whole job still run unchanged;
    ``skip_unknown=True`` is now the default, ``skip_unknown=False`` asked for the strict mode.
    """
    skip = kwargs.pop("skip_unknown", None)
    if skip is None:
        return
    warnings.warn("skip_unknown is deprecated: markets without a model are quarantined by default; pass "
                  "require_all=True to fail instead", DeprecationWarning, stacklevel=3)
    if "require_all" in kwargs and bool(kwargs["require_all"]) == bool(skip):
        raise ValueError(f"skip_unknown={skip!r} contradicts require_all={kwargs['require_all']!r}: "
                         "pass require_all only (skip_unknown is deprecated)")
    kwargs["require_all"] = not skip


def _translate_bf16(kwargs: dict[str, Any]) -> None:
    """Map the legacy ``bf16=True`` onto ``precision="bf16"``, in place (``bf16=False`` leaves ``precision``)."""
    if kwargs.pop("bf16", False):
        if kwargs.get("precision", "auto") not in ("auto", "bf16"):
            raise ValueError(f"bf16=True contradicts precision={kwargs['precision']!r}: pass precision only")
        kwargs["precision"] = "bf16"


def score_dataset(source: str, output: str | os.PathLike, *, engine: str = "local", **kwargs: Any) -> dict[str, Any]:
    """Score ``source`` into ``output`` with ``engine`` (``local`` or ``spark``); returns the summary.

    Check ``summary["status"]``: ``"partial"`` means some markets had no model and their rows were
    quarantined (``summary["unscored_markets"]``); pass ``require_all=True`` to fail instead.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is invalid: expected one of {list(ENGINES)}")
    _translate_skip_unknown(kwargs)
    _translate_bf16(kwargs)
    if engine == "spark":
        from relevance.serving.spark_scoring import score_with_spark

        return score_with_spark(source, output, **kwargs)
    kwargs.pop("spark_master", None)  # meaningful to the Spark engine only
    return score_local(source, output, **kwargs)
