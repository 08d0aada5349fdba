"""The MLflow pyfunc of one market's merged cross-encoder: a DataFrame of (query, ad) → probabilities.

Why a custom ``PythonModel``: ``mlflow.transformers``' pyfunc ignores text pairs (DESIGN.md §6).

Why *models from code* and a self-contained file: MLflow copies this file into every logged model
and executes it when the model is loaded, so the registered artifact is code + safetensors + JSON,
with no pickle (MLflow 3 refuses to unpickle by default anyway), and it loads wherever its pip
requirements are installed, without this project. It therefore imports only numpy, pandas, torch,
transformers and mlflow, and repeats the pair encoding of :mod:`relevance.model.cross_encoder` (query
clipped to half of ``max_length`` tokens, ad = title + description, ``truncation="only_second"``,
``[<market>] `` prefix for ``lora-market-token``). ``tests/relevance/test_registry.py`` checks that
both encodings and both scores agree.

``model_config`` (written by :mod:`relevance.serving.registry`): ``market``, ``market_token``, ``max_length``,
``batch_size``, ``method``, ``bf16_parity`` (fp32 vs bf16 agreement on the market's valid rows, measured at
registration by :mod:`relevance.serving.parity`; ``ok`` when |ΔAUC| ≤ 0.001), ``generic_tokenizer``
(arguments to load the tokenizer as ``PreTrainedTokenizerFast``, where registration found it identical:
:func:`load_tokenizer`). Predict ``params``: ``batch_size``; ``precision`` (``auto``: bf16 where the hardware
computes it natively *and* this version's parity held, fp32 otherwise; ``fp32`` / ``bf16`` force it); ``bf16``
(legacy: true forces bf16); ``threads`` (torch intra-op threads, 0 = leave as is; Spark sets it so parallel
tasks do not oversubscribe cores).
The model runs on ``ADS_RELEVANCE_DEVICE`` if set, else on a CUDA GPU when one is visible, else the CPU.
bf16 scoring casts the weights (not only autocast) and keeps the classification head and the sigmoid in
fp32. The hardware test repeats :func:`relevance.model.precision.native_bf16` (this file is self-contained).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
import os
from pathlib import Path
import platform
import sys
import threading
import types
from typing import Any
import weakref

import mlflow
import numpy as np
import pandas as pd

MARKET_TOKEN_FORMAT = "[{market}] {query}"  # == relevance.model.cross_encoder.MARKET_TOKEN_FORMAT
DEFAULT_BATCH_SIZE = 64
CHUNK_ROWS = 1024  # rows tokenized ahead by the producer thread (and length-sorted together)
BATCH_GROWTH = 4  # short pairs may fill up to 4 × batch_size rows within the token budget
PRECISIONS = ("auto", "fp32", "bf16")
_CPU_BF16_FLAGS = {"amx_bf16"}  # native on any vendor (relevance.model.precision)
_AMD_BF16_FLAGS = {"avx512_bf16"}  # native on AMD only; slower than fp32 on an Intel VM without AMX
_TOKENIZE_LOCK = threading.Lock()  # encode()'s default; models share theirs with their tokenizer (shared_tokenizer)
_SHARED_TOKENIZERS = "_ads_relevance_shared_tokenizers"  # the process-wide registry's name in sys.modules
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")  # not hashed by tokenizer_digest
CPU_ATTENTION = "ads_relevance_cpu_bf16"  # registered with transformers by bf16_copy (on a CPU), not at import
CPU_ATTENTION_MAX_KEYS = 256  # longer sequences: sdpa's flash kernel (its blocks are no longer small there)
CPU_ATTENTION_MAX_KEYS_AMX = 32  # with AMX, sdpa's flash kernel runs on AMX tiles and wins beyond this
CPU_ATTENTION_SCORES = 1 << 19  # fp32 scores per chunk (2 MiB): a chunk's working set stays in cache
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc: blocks below this come from the heap (32 MiB: its 64-bit maximum)
MALLOC_TRIM_THRESHOLD = 1 << 30  # glibc: keep up to 1 GiB of freed heap for reuse instead of returning it


def native_bf16(device: Any) -> bool:
    """Whether ``device`` computes bf16 natively (== relevance.model.precision.native_bf16)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    override = os.environ.get("ADS_RELEVANCE_NATIVE_BF16")
    if override in ("0", "1"):
        return override == "1"
    vendor, flags = cpu_flags()
    return bool(_CPU_BF16_FLAGS & flags) or (vendor == "AuthenticAMD" and bool(_AMD_BF16_FLAGS & flags))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; ("", {}) where there is none (not Linux)."""
    if platform.system() != "Linux":
        return "", frozenset()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if "flags" in fields and "vendor_id" in fields:
                    break
    except OSError:
        return "", frozenset()
    return fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())


def cpu_attention_max_keys() -> int:
    """Longest key length :func:`cpu_bf16_attention` computes itself on this CPU; sdpa's flash kernel beyond it.

    Why it depends on the CPU: without AMX (Zen 5's AVX512-BF16) flash's 32-query blocks of tiny GEMMs lose
    to the chunked GEMMs up to 256 keys. With AMX its blocks run on AMX tiles: on a 2-core AMX Xeon flash took
    8.6-9.3 ms per e5 layer at 32 x 126 tokens against 9.5-12.4 ms here, and end to end (two trained e5
    markets, 4,320 long pairs, bf16, ABBA) scored 107-141 pairs/s against 82-105; at 30 keys this kernel was
    still 1.3-2.4x faster (1.0-1.6 vs 2.2-2.5 ms), at 40-56 keys level or slower."""
    return CPU_ATTENTION_MAX_KEYS_AMX if "amx_bf16" in cpu_flags()[1] else CPU_ATTENTION_MAX_KEYS


def scoring_device() -> Any:
    """``ADS_RELEVANCE_DEVICE`` (e.g. ``cpu``, ``cuda:1``) if set, else the first CUDA GPU if any, else the CPU."""
    import torch

    chosen = os.environ.get("ADS_RELEVANCE_DEVICE")
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_copy(model: Any, cpu_attention: bool = True) -> Any:
    """A bf16 copy of ``model`` whose classification head (``classifier`` / ``score``) stays fp32.

    Why the head: the logit is a sum over the hidden size; in fp32 it keeps the resolution that ranks
    close pairs apart (a bf16 logit has 8 significant bits, and ties cost AUC). On a CPU the copy's
    attention is :func:`cpu_bf16_attention` unless ``cpu_attention`` is False; the fp32 model keeps sdpa.
    """
    import torch

    # Each parameter is cast straight into the copy (deepcopy's memo maps it to its bf16 tensor): copying
    # the fp32 model first and casting it after took 1.4-3.9 s and a second fp32 model's memory for
    # multilingual-e5-small on a 2-core CPU, this 0.25-0.7 s (``bf16_copy``'s test holds it to the old form).
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    out = copy.deepcopy(model, memo).to(torch.bfloat16)  # .to: the floating-point buffers
    head = next((getattr(out, n) for n in ("classifier", "score") if isinstance(getattr(out, n, None), torch.nn.Module)),
                None)
    if head is not None:
        head.float()
        head.register_forward_pre_hook(lambda _m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    if cpu_attention and next(out.parameters()).device.type == "cpu":
        use_cpu_attention(out)
    return out.eval()


def cpu_bf16_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention for bf16 scoring on a CPU: batched GEMMs over a few examples at a time.

    Why: sdpa's CPU flash kernel cuts every (example, head) into 32-query blocks and runs two tiny GEMMs per
    block; at BERT-sized heads (d = 32, ~128 tokens) their call overhead makes attention ~35% of the
    forward at ~80 GFLOP/s (multilingual-e5-small, 2-core Zen 5). Here each chunk of examples is one fp32
    ``baddbmm`` for Q·Kᵀ plus the key-padding bias, an fp32 softmax, and one bf16 ``bmm`` for P·V: ~1.3x
    faster than flash at 126 tokens. A chunk holds ≤ :data:`CPU_ATTENTION_SCORES` scores, so the softmax
    works in cache. Rounding as in flash: fp32 scores (from bf16 q and k, exact in fp32), P in bf16. Scores
    rounded to bf16 (a bf16 Q·Kᵀ, ~1.7x faster than flash) were tried: 4x flash's error per attention output,
    and a trained e5 market then failed the registration's parity bar (two swapped pairs on 60 valid rows)
    and scored in fp32. Anything else (dropout, a mask that differs between queries or heads, grouped-query
    attention, more keys than :func:`cpu_attention_max_keys`, another dtype or device) is sdpa's. q, k, v: (B, H, L, D); ``attention_mask``: bool (True = attend)
    or additive, (B|1, 1, L, L), or None. Returns (B, L, H, D) like transformers' sdpa function.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lk = key.shape[2]
    covered = not (dropout or query.device.type != "cpu" or query.dtype != torch.bfloat16
                   or key.shape[1] != query.shape[1] or lk > cpu_attention_max_keys()
                   or getattr(module, "is_causal", False) or kwargs.get("is_causal"))
    bias = _key_padding_bias(attention_mask, lk) if covered else False  # the mask is read only when it can be used
    if bias is False:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    with torch.profiler.record_function(CPU_ATTENTION):  # profiles count its GEMMs as attention, not as layers
        return _chunked_attention(query, key, value, bias, scaling), None


def _chunked_attention(query: Any, key: Any, value: Any, bias: Any, scaling: float | None) -> Any:
    """:func:`cpu_bf16_attention`'s arithmetic: (B, H, L, D) bf16 inputs, bias (B|1, 1, Lk) or None → (B, L, H, D)."""
    import torch

    b, h, lq, d = query.shape
    lk = key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    if bias is None:
        bias = torch.zeros(1, 1, lk, device=query.device)
    out = torch.empty(b, lq, h, d, dtype=query.dtype, device=query.device)  # (B, L, H, D)
    step = max(1, CPU_ATTENTION_SCORES // (h * lq * lk))
    for s in range(0, b, step):
        rows = slice(s, s + step)
        n = min(step, b - s)
        # Q·Kᵀ in fp32 from the bf16 q and k (exact in fp32): fp32 scores, as sdpa's flash kernel keeps them
        qs = query[rows].reshape(n * h, lq, d).float()
        kt = key[rows].reshape(n * h, lk, d).transpose(1, 2).float()
        rows_bias = (bias if bias.shape[0] == 1 else bias[rows]).expand(n, h, lk).reshape(n * h, 1, lk)
        scores = torch.baddbmm(rows_bias, qs, kt, alpha=scale)  # (n·H, L, L) fp32
        probs = torch.softmax(scores, dim=-1).to(query.dtype)  # P in bf16 for P·V, as in flash
        out[rows] = torch.bmm(probs, value[rows].reshape(n * h, lk, d)).view(n, h, lq, d).transpose(1, 2)
    return out


def _key_padding_bias(mask: Any, lk: int) -> Any:
    """(B|1, 1, Lk) additive fp32 bias of a mask that is the same for every query and head; None without a
    mask; False for any other mask. transformers hands encoders a materialised (B, 1, L, L) bool mask."""
    import torch

    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != lk:
        return False
    first = mask[:, :, :1, :]
    if not torch.equal(mask, first.expand_as(mask)):
        return False
    first = first.reshape(first.shape[0], 1, lk)
    if first.dtype == torch.bool:
        return torch.zeros(first.shape, device=first.device).masked_fill_(~first, float("-inf"))
    return first.float()


def use_cpu_attention(model: Any) -> None:
    """Point ``model``'s sdpa attention at :func:`cpu_bf16_attention` (registered here, once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, cpu_bf16_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_ATTENTION, sdpa_mask)
    for config in {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}.values():
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = CPU_ATTENTION


def retain_freed_memory() -> bool:
    """Let glibc keep freed activation buffers for the next forward instead of unmapping them; True if set.

    Why: by default a freed block above glibc's (adaptive) mmap threshold, or free heap above 128 KiB, goes
    back to the kernel, so each forward maps its activations afresh: one page fault per 4 KiB written.
    A bf16 forward of multilingual-e5-small on 32 pairs of 128 tokens took ~30,000 faults and 350 ms on a
    2-core VM; with these two thresholds ~0 faults and ~315 ms. PyTorch's CPU tuning guide swaps in
    jemalloc or tcmalloc for the same reason; this is the in-process form. Process-wide (the process scores,
    or serves, models), glibc only, at model load (never at import); ``ADS_RELEVANCE_MALLOC_TUNING=0`` skips it.
    """
    import ctypes

    if os.environ.get("ADS_RELEVANCE_MALLOC_TUNING") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def ad_text(title: Any, description: Any) -> str:
    """``title + " " + description``; a null or blank description gives the title alone."""
    if _missing(description):
        return str(title)
    description = str(description).strip()
    return f"{title} {description}" if description else str(title)


def pair_texts(df: pd.DataFrame, market: str | None, market_token: bool) -> tuple[list[str], list[str]]:
    """(queries, ads) of a frame; queries carry the market prefix when ``market_token``."""
    queries = [str(q) for q in df["query"].tolist()]
    if market_token:
        queries = [MARKET_TOKEN_FORMAT.format(market=market, query=q) for q in queries]
    descriptions = df["ad_description"].tolist() if "ad_description" in df.columns else [None] * len(df)
    ads = [ad_text(t, d) for t, d in zip(df["ad_title"].tolist(), descriptions)]
    return queries, ads


def clip_queries(tokenizer: Any, queries: list[str], max_tokens: int) -> list[str]:
    """Cut queries longer than ``max_tokens`` tokens at a token boundary, so the ad keeps its half."""
    long = [i for i, q in enumerate(queries) if len(q) > max_tokens]
    if not long:
        return queries
    enc = tokenizer([queries[i] for i in long], add_special_tokens=False, return_offsets_mapping=True)
    out = list(queries)
    for i, offsets in zip(long, enc["offset_mapping"]):
        if len(offsets) > max_tokens:
            out[i] = queries[i][: offsets[max_tokens - 1][1]]
    return out


class SharedTokenizer:
    """A tokenizer and the lock that every use of it holds (:func:`encode`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lock = tokenizer, threading.Lock()


def tokenizer_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the files in a model directory other than its weights: what ``AutoTokenizer`` reads."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def load_tokenizer(path: str | os.PathLike, generic: dict[str, Any] | None = None) -> Any:
    """``AutoTokenizer`` of ``path``, or given ``generic`` (keyword arguments, e.g. ``model_input_names``) the
    plain fast tokenizer over its ``tokenizer.json``.

    Why ``generic``: ``AutoTokenizer`` builds the class named in ``tokenizer_config.json``, and classes with
    their own ``__init__`` (``XLMRobertaTokenizer``, ``BertTokenizer``) parse the 17 MB ``tokenizer.json`` of
    multilingual-e5 in Python and rebuild the backend from its vocabulary: 1.7 s on a 2-core Zen 5, where
    ``PreTrainedTokenizerFast`` reads the same file in Rust in 0.6 s. The two are the same tokenizer only
    when the saved ``tokenizer.json`` is the rebuilt backend (``save_pretrained`` writes it so) and the class's
    input names are passed on (BERT's include ``token_type_ids``), which registration checks per version
    (:mod:`relevance.serving.tokenizer_check`; config ``generic_tokenizer`` holds the arguments).
    """
    if generic is not None:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, **generic)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_key(path: str | os.PathLike, generic: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """:func:`shared_tokenizer`'s cache key: the files' digest and how they are loaded (:func:`load_tokenizer`)."""
    return tokenizer_digest(path), None if generic is None else repr(sorted(generic.items()))


def shared_tokenizer(path: str | os.PathLike, generic: dict[str, Any] | None = None) -> SharedTokenizer:
    """The tokenizer in ``path`` (:func:`load_tokenizer`), loaded once per process for every model whose
    tokenizer files are identical.

    Why: transformers takes 2-4 s to load multilingual-e5's tokenizer (it parses its 17 MB tokenizer.json
    twice), and a scoring job loads one model per market, usually all trained from one base. Why a module
    in ``sys.modules`` holds the cache: MLflow executes this file as a fresh module for every model it
    loads, so a module-level dict would serve one model only. Entries are weak: a tokenizer is freed with
    the last model that holds it. Models that share a tokenizer share its lock (see :func:`encode`).
    """
    registry = sys.modules.get(_SHARED_TOKENIZERS)
    if registry is None:
        fresh = types.ModuleType(_SHARED_TOKENIZERS, "tokenizers shared by ads-relevance models (pyfunc_model.py)")
        fresh.lock, fresh.entries = threading.Lock(), weakref.WeakValueDictionary()
        registry = sys.modules.setdefault(_SHARED_TOKENIZERS, fresh)
    key = tokenizer_key(path, generic)
    with registry.lock:
        entry = registry.entries.get(key)
        if entry is None:
            entry = registry.entries[key] = SharedTokenizer(load_tokenizer(path, generic))
    return entry


def encode(tokenizer: Any, queries: list[str], ads: list[str], max_length: int,
           lock: threading.Lock = _TOKENIZE_LOCK) -> dict[str, list[list[int]]]:
    """Unpadded token ids of the pairs; only the ad side is truncated to ``max_length``.

    Under a lock: a transformers tokenizer call first sets truncation on the shared Rust backend, then
    encodes, and ``mlflow models serve`` runs concurrent requests in threads on one model (and models may
    share a tokenizer: ``lock`` is then the shared one, :func:`shared_tokenizer`). Unlocked, one request's
    query clipping (truncation off) could land between another's setting and encoding: an ad left
    untruncated (805 tokens seen with e5's tokenizer, past its 512 positions) or a failed request.
    """
    with lock:
        queries = clip_queries(tokenizer, queries, max_length // 2)
        enc = tokenizer(queries, ads, truncation="only_second", max_length=max_length, padding=False,
                        return_attention_mask=False)
    return {k: list(v) for k, v in enc.items()}


def token_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices in batches by padded size: rows sorted by length, a batch closed when one more row
    would make ``rows × longest`` exceed ``max_tokens`` or ``max_rows`` (one row always fits)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        if end - start > 1 and ((end - start) * longest > max_tokens or end - start > max_rows):
            batches.append(order[start:end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


def _pad(enc: dict[str, list[list[int]]], idx: np.ndarray, pad_id: int) -> dict[str, Any]:
    import torch

    rows = [enc["input_ids"][i] for i in idx]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64) if "token_type_ids" in enc else None
    for j, i in enumerate(idx):
        n = len(rows[j])
        ids[j, :n], mask[j, :n] = rows[j], 1
        if types is not None:
            types[j, :n] = enc["token_type_ids"][i]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    return out


class RelevanceModel(mlflow.pyfunc.PythonModel):
    """One market's merged cross-encoder; ``predict`` returns one probability per input row."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForSequenceClassification

        self.config = dict(context.model_config or {})
        path = context.artifacts["model"]
        self.market: str | None = self.config.get("market")
        self.market_token = bool(self.config.get("market_token", False))
        self.max_length = int(self.config.get("max_length", 128))
        self.batch_size = int(self.config.get("batch_size", DEFAULT_BATCH_SIZE))
        # the attention kernel whose bf16 parity held at registration (relevance.serving.parity.measure)
        self.cpu_attention = bool((self.config.get("bf16_parity") or {}).get("cpu_attention", True))
        # Held: the registry's entry lives as long as a model uses it. ``generic_tokenizer``: the plain fast
        # tokenizer, where registration found it identical to AutoTokenizer's (load_tokenizer).
        self._shared = shared_tokenizer(path, self.config.get("generic_tokenizer"))
        self.tokenizer = self._shared.tokenizer
        # use_safetensors: a model directory holding only pickled weights fails instead of unpickling.
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        self.model = model.to(scoring_device())
        if self.model.device.type == "cpu":
            retain_freed_memory()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        precision = "bf16" if params.get("bf16") else str(params.get("precision") or "auto")
        return self.score_frame(model_input, batch_size=int(params.get("batch_size") or self.batch_size),
                                precision=precision, threads=int(params.get("threads") or 0))

    def resolve_precision(self, precision: str = "auto") -> str:
        """``bf16`` or ``fp32``: ``auto`` is bf16 only on native-bf16 hardware for a version whose parity held."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid: expected one of {list(PRECISIONS)}")
        if precision != "auto":
            return precision
        parity_ok = bool((self.config.get("bf16_parity") or {}).get("ok", False))
        return "bf16" if parity_ok and native_bf16(next(self.model.parameters()).device) else "fp32"

    def model_for(self, precision: str) -> Any:
        """The fp32 model, or its bf16 copy (made once, on first use) for ``precision == "bf16"``."""
        if precision != "bf16":
            return self.model
        if getattr(self, "_bf16_model", None) is None:
            self._bf16_model = bf16_copy(self.model, self.cpu_attention)
        return self._bf16_model

    def set_cpu_attention(self, enabled: bool) -> None:
        """Use :func:`cpu_bf16_attention` (True) or sdpa (False) in the bf16 copy from now on."""
        if bool(enabled) != self.cpu_attention:
            self.cpu_attention, self._bf16_model = bool(enabled), None

    def check_markets(self, df: pd.DataFrame) -> None:
        """A ``market`` column, when given, must hold this model's market only (never score fr with de)."""
        if "market" not in df.columns or self.market is None:
            return
        other = sorted({str(m) for m in df["market"].tolist() if str(m) != self.market})
        if other:
            raise ValueError(f"this model scores market {self.market!r} only, but the input has markets "
                             f"{other[:5]}: score each market with its own model")

    def score_frame(self, df: pd.DataFrame, batch_size: int | None = None, precision: str = "auto",
                    threads: int = 0, bf16: bool | None = None) -> np.ndarray:
        """Probabilities for every row of ``df`` (query, ad_title[, ad_description][, market]), in order.

        Rows are tokenized in chunks of :data:`CHUNK_ROWS` one chunk ahead of the model (a producer
        thread), sorted by token length within a chunk and cut into batches of at most
        ``batch_size × max_length`` tokens (:func:`token_batches`), so padding wastes little compute
        and short pairs run in larger batches.
        ``precision``: see :meth:`resolve_precision`; ``bf16=True`` (legacy) means ``precision="bf16"``.
        """
        import torch

        batch_size = int(batch_size or self.batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected a positive integer")
        for column in ("query", "ad_title"):
            if column not in df.columns:
                raise ValueError(f"input lacks column {column!r}: expected query, ad_title[, ad_description]")
        self.check_markets(df)
        model = self.model_for(self.resolve_precision("bf16" if bf16 else precision))
        out = np.empty(len(df), dtype=np.float64)
        if len(df) == 0:
            return out
        if threads > 0:
            torch.set_num_threads(threads)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(model.parameters()).device
        budget = batch_size * self.max_length  # tokens per forward: short pairs get more rows
        chunks = [np.arange(i, min(i + CHUNK_ROWS, len(df))) for i in range(0, len(df), CHUNK_ROWS)]

        def tokenize(rows: np.ndarray) -> dict[str, list[list[int]]]:
            queries, ads = pair_texts(df.iloc[rows], self.market, self.market_token)
            return encode(self.tokenizer, queries, ads, self.max_length, self._shared.lock)

        # A producer thread tokenizes chunk k+1 while chunk k runs (torch releases the GIL in its kernels).
        with ThreadPoolExecutor(max_workers=1) as producer, torch.inference_mode():
            pending = producer.submit(tokenize, chunks[0])
            for k, rows in enumerate(chunks):
                enc = pending.result()
                if k + 1 < len(chunks):
                    pending = producer.submit(tokenize, chunks[k + 1])
                for idx in token_batches([len(x) for x in enc["input_ids"]], batch_size * BATCH_GROWTH, budget):
                    batch = {key: v.to(device) for key, v in _pad(enc, idx, pad_id).items()}
                    logits = model(**batch).logits.float().view(-1)
                    out[rows[idx]] = torch.sigmoid(logits).cpu().numpy()
        return out


# MLflow executes this file under a generated module name to load a model; a plain import of
# ``relevance.serving.pyfunc_model`` (tests, the registry) must not touch MLflow's global model slot.
if not __name__.startswith("relevance."):
    mlflow.models.set_model(RelevanceModel())
