"""The cross-encoder: a transformers sequence classifier with one relevance logit over (query, ad).

Pair encoding (why each choice):

- The pair is ``(query, ad_title + " " + ad_description)``; a null description gives the title alone.
- Truncation cuts the *ad* only (``truncation="only_second"``): the query is what the shopper asked
  and is short, the ad's description is the long, least informative tail. A pathological query
  longer than half of ``max_length`` tokens (the contract allows 2,000 characters) is first clipped
  to that half, so the ad always keeps the other half and the tokenizer never fails.
- Market token (method ``lora-market-token``): the query becomes ``"[<market>] <query>"``, e.g.
  ``"[de] apex red bike"``: plain text that any tokenizer encodes (``[``, ``de``, ``]``), added before
  clipping so it is never cut. :data:`MARKET_TOKEN_FORMAT` is the single definition.

``score`` returns probabilities (sigmoid of the logit) in input order; inside it, examples are sorted
by length so each padded batch wastes little compute.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data_contracts.markets import task_index
from relevance.model.batching import collate, length_sorted_batches
from relevance.model.precision import autocast, check_precision, fp32_head

logger = logging.getLogger(__name__)

MARKET_TOKEN_FORMAT = "[{market}] {query}"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_cross_encoder(base_model: str | Path, device: str | torch.device | None = None,
                       saved_modules: Sequence[str] = ("classifier",)) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``AutoModelForSequenceClassification(num_labels=1)`` + ``AutoTokenizer``.

    ``base_model`` is a local directory or a model name resolvable offline (hub cache). A path-like
    value that does not exist is a ``FileNotFoundError`` naming it, instead of a hub lookup error.
    ``saved_modules`` are the modules the adapter trains and saves (its ``modules_to_save``): weights
    missing from the base outside them are reported (see :func:`_warn_untrained`).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text = str(base_model)
    path = Path(text).expanduser()
    looks_like_path = isinstance(base_model, Path) or text.startswith((".", "/", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise FileNotFoundError(
            f"base model {text!r} does not exist: expected a directory with config.json, weights "
            "(model.safetensors) and tokenizer files, as written by save_pretrained "
            "(e.g. relevance.model.tiny.build_tiny_model(dir) or a downloaded transformers model)"
        )
    if looks_like_path and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model directory {text!r} has no config.json: expected a transformers model "
            "directory written by save_pretrained"
        )
    source = str(path) if looks_like_path else text
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, info = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1,
                                                                         output_loading_info=True)
    except OSError as exc:  # a name that is neither a local directory nor in the offline cache
        raise FileNotFoundError(
            f"base model {text!r} could not be loaded: it is not a local model directory and not a model "
            f"name available offline ({exc.__class__.__name__}: {str(exc)[:200]}); pass the directory of a "
            "transformers model (config.json, weights, tokenizer)"
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"base model {text!r} has no fast tokenizer (tokenizer.json): one is required")
    _warn_untrained(text, info.get("missing_keys", ()), saved_modules)
    return model.to(resolve_device(device)), tokenizer


def _warn_untrained(name: str, missing: Any, saved_modules: Sequence[str]) -> None:
    """Say so when the base lacks weights besides the new head (e.g. multilingual-e5 has no pooler).

    Such layers are freshly initialised from the RNG: unless they are trained and saved (listed in
    ``modules_to_save``), a reload gives other random values than the ones the adapter was trained on.
    """
    from relevance.model.adapters.heads import name_matches

    def saved(module: str) -> bool:  # the module or one of its parents is trained and saved
        parts = module.split(".")
        return any(name_matches(".".join(parts[:i]), p) for i in range(1, len(parts) + 1) for p in saved_modules)

    modules = sorted({m for m in (k.rsplit(".", 1)[0] for k in missing) if not saved(m)})
    if modules:
        logger.warning("base model %s has no weights for %s: they are freshly initialised. Train and save "
                       "them with the adapter by adding them to modules_to_save (for a missing pooler: "
                       "--modules-to-save classifier,pooler)", name, ", ".join(modules))


def ad_text(title: str, description: str | None) -> str:
    """``title + " " + description``; a null or blank description gives the title alone."""
    if description is None or (isinstance(description, float) and np.isnan(description)):
        return title
    description = str(description).strip()
    return f"{title} {description}" if description else title


def with_market_token(query: str, market: str) -> str:
    """The query as ``lora-market-token`` sees it: ``"[de] apex red bike"``."""
    return MARKET_TOKEN_FORMAT.format(market=market, query=query)


def _clip_queries(tokenizer: Any, queries: list[str], max_tokens: int) -> list[str]:
    """Cut queries longer than ``max_tokens`` tokens at a token boundary (text kept verbatim)."""
    long = [i for i, q in enumerate(queries) if len(q) > max_tokens]  # a token spans >= 1 char
    if not long:
        return queries
    enc = tokenizer([queries[i] for i in long], add_special_tokens=False, return_offsets_mapping=True)
    out = list(queries)
    for i, offsets in zip(long, enc["offset_mapping"]):
        if len(offsets) > max_tokens:
            out[i] = queries[i][: offsets[max_tokens - 1][1]]
    return out


def encode_pairs(
    tokenizer: Any, queries: Sequence[str], ads: Sequence[str], max_length: int = 128
) -> dict[str, list[list[int]]]:
    """Token ids of (query, ad) pairs, unpadded; the ad side alone is truncated to ``max_length``."""
    if max_length < 8:
        raise ValueError(f"max_length={max_length} is too small for a (query, ad) pair: use >= 8")
    queries = _clip_queries(tokenizer, list(queries), max_length // 2)
    enc = tokenizer(
        queries, list(ads), truncation="only_second", max_length=max_length, padding=False,
        return_attention_mask=False,
    )
    return {k: list(v) for k, v in enc.items()}


def pair_texts(df: pd.DataFrame, market_token: bool = False) -> tuple[list[str], list[str]]:
    """(queries, ads) of a curated frame; queries carry the market prefix when ``market_token``."""
    queries = df["query"].astype(str).tolist()
    if market_token:
        queries = [with_market_token(q, m) for q, m in zip(queries, df["market"].astype(str))]
    descriptions = df["ad_description"] if "ad_description" in df.columns else [None] * len(df)
    ads = [ad_text(str(t), d) for t, d in zip(df["ad_title"], descriptions)]
    return queries, ads


def encode_frame(
    tokenizer: Any, df: pd.DataFrame, max_length: int = 128, market_token: bool = False
) -> dict[str, list[list[int]]]:
    """:func:`encode_pairs` of a curated frame (columns query, ad_title, ad_description, market)."""
    queries, ads = pair_texts(df, market_token)
    return encode_pairs(tokenizer, queries, ads, max_length)


def task_ids_for(model: torch.nn.Module, markets: Sequence[str],
                 task_map: Mapping[str, int] | None = None) -> torch.Tensor | None:
    """Per-example task ids when ``model`` is task-conditioned, else ``None``.

    ``task_map`` defaults to the one stored in the model's adapter config; an unknown market is a
    ``KeyError`` naming the market and the known ones.
    """
    config = getattr(model, "adapter_config", None)
    if config is None or not getattr(config, "is_task_conditioned", False):
        return None
    mapping = task_map if task_map is not None else config.task_map
    return torch.tensor([task_index(mapping, m) for m in markets], dtype=torch.long)


def task_routing(model: torch.nn.Module, ids: torch.Tensor | None):
    """``use_tasks(model, ids)`` for an adapted model; nothing for a plain one."""
    if getattr(model, "adapter_config", None) is None:
        return nullcontext()
    from relevance.model.adapters import use_tasks

    return use_tasks(model, ids)


def score(
    model: torch.nn.Module,
    tokenizer: Any,
    df: pd.DataFrame,
    task_map: Mapping[str, int] | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    market_token: bool = False,
    precision: str = "auto",
) -> np.ndarray:
    """Relevance probabilities (sigmoid of the logit) for every row of ``df``, in input order.

    ``precision`` (:mod:`relevance.model.precision`): ``auto`` runs under bf16 autocast where the
    device computes bf16 natively; the classification head and the sigmoid always run in fp32.

    ``df`` needs query, ad_title (ad_description optional) and, for a task-conditioned model or
    ``market_token``, market. Runs under ``torch.inference_mode`` in eval mode (restored after).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected a positive integer")
    check_precision(precision)
    if len(df) == 0:
        return np.zeros(0, dtype=np.float64)
    enc = encode_frame(tokenizer, df, max_length, market_token)
    if "market" not in df.columns and (market_token or task_ids_for(model, []) is not None):
        raise ValueError("df needs a 'market' column: the model is task-conditioned or uses market tokens")
    ids = task_ids_for(model, df["market"].astype(str).tolist(), task_map) if "market" in df.columns else None
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.empty(len(df), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in length_sorted_batches([len(x) for x in enc["input_ids"]], batch_size):
                batch = collate(enc, idx, pad_id, device=device)
                with task_routing(model, None if ids is None else ids[idx].to(device)), autocast(precision, device), \
                        fp32_head(model):
                    logits = model(**batch).logits
                out[idx] = torch.sigmoid(logits.float().view(-1)).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def predictions_frame(df: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """(example_id, market, label, score[, query_id]): what ``relevance.evaluation.metrics`` evaluates
    and ``RUN/predictions/*.parquet`` hold.

    ``query_id`` is kept whenever ``df`` has it (curated data always does): the evaluation
    resamples whole queries, since rows of one query are not independent evidence.
    """
    frame = pd.DataFrame({"example_id": df["example_id"].to_numpy(), "market": df["market"].to_numpy(),
                          "label": df["label"].to_numpy().astype("int64"),
                          "score": np.asarray(scores, dtype=np.float64)})
    if "query_id" in df.columns:
        frame["query_id"] = df["query_id"].to_numpy()
    return frame


def predict(model: torch.nn.Module, tokenizer: Any, df: pd.DataFrame, batch_size: int = 64,
            max_length: int = 128, market_token: bool = False) -> pd.DataFrame:
    """:func:`score` of a labelled frame as a :func:`predictions_frame`."""
    return predictions_frame(df, score(model, tokenizer, df, batch_size=batch_size, max_length=max_length,
                                       market_token=market_token))
