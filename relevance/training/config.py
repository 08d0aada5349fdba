"""What defines a training run: :class:`TrainConfig`, validated field by field.

Kept apart from the training loop (:mod:`relevance.training.loop`) so that the pipeline, the CLI and resume
checks can build and compare configs without reading the loop. Bad values raise ``ValueError`` naming
the field, the value and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from data_contracts.markets import validate_market
from relevance.model.precision import PRECISIONS

# multilora / moelora: the MTL-LoRA paper's baselines, allowed but not trained by the pipeline by default.
# separate: one model per market (its own LoRA and head, fine-tuned on its rows only), in one run.
METHODS = ("mtl-lora", "lora", "lora-market-token", "per-market-lora", "multilora", "moelora", "separate")
SAMPLING = ("proportional", "temperature")
# Fields that may differ between a run and its resumption: where things are, not what is learned.
RUNTIME_FIELDS = frozenset({"data", "out", "device", "tracking_uri", "experiment", "run_name",
                            "track", "progress", "resume", "keep_checkpoints"})


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_POS_INT = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_OPT_POS_INT = (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or None")
_POS_NUM = (lambda v: _is_num(v) and v > 0, "a positive finite number")
_NON_NEG = (lambda v: _is_num(v) and v >= 0, "a non-negative finite number")
_FRACTION = (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
# MTL-LoRA's Λ_t / w_t learn at max(3, T) × the learning rate for T markets unless told otherwise (issue 15).
# 3 markets: 1× leaves them where the init put them, 10× let one crossing-policy market collapse within its
# rows, 3× held. Each market's Λ_t / w_t see about 1/T of every batch, so with more markets they need more:
# at 9 markets 3× kept only a third of the crossing twin's win, 9× kept all of it (quality benchmark).
DEFAULT_TASK_LR_SCALE = 3.0
# per-market-lora's A_t / B_t stay at the learning rate: the same 1/T argument does not carry over. On the
# demo's data and budget (benchmarks/results/per_market_lr_demo.md, 4 seeds) 5× and 10× drove markets to
# constant scores (AUC 0.50) while 1× learned; unlike Λ_t (neutral at I) a large step on B_t moves the output.
PER_MARKET_LORA_LR_SCALE = 1.0
# per-market-lora's shared start (relevance.training.shared_start): the fraction of the steps in which its
# markets train one shared adapter before each continues on its own copy. Default 0, own adapters from step 1
# (the baseline measures per-market adapters without sharing): 0.5 narrows its deficit to shared LoRA (nested
# policy data, 4 seeds: macro -0.127 -> -0.027, behind in every seed; demo gb, 4 seeds: -0.086 -> -0.036) but
# does not close it, and moves the per-market wins (demo de +0.204 -> +0.066; crossing, 3 seeds: de +0.101 ->
# +0.177, de-any +0.102 -> +0.059); benchmarks/results/per_market_lr_shared_start_*.md.
DEFAULT_SHARED_START = 0.0
# LoRA+ (Hayou et al., 2024): every method's up-projections B learn at a multiple of their group's learning
# rate (relevance.training.optim, whose docstring has the measurements): by default B_LR_BUDGET / max(3, T)
# for T markets in training, never below 1 — 4× for 3 markets, 2.4× for 5, 1.33× for 9. MTL-LoRA's Λ_t / w_t
# already learn at max(3, T)×, so B's multiple shrinks as theirs grows: with 3 markets 4× held the crossing
# clause in 8 of 8 seeds (6 of 8 at 1×; 2× and 3× missed seeds 1-2) and kept nested markets level; with 9,
# 4× (next to Λ_t at 9×) cost MTL-LoRA four agreeing markets while 2× and 1× held them (issue 15).
B_LR_BUDGET = 12.0
# Evaluations per run when ``eval_every`` is not given: a quarter of the steps, at most every EVAL_EVERY_MAX. The
# divergence guard (relevance.training.divergence) can only go back to an evaluation it has: with one at the
# end, shared LoRA's nested-policy seed 1 on e5-small (fp32, 200 steps, B at 4x) reached valid AUC 0.914 at
# step 50 and shipped every row scored alike (test spread 0.0002, macro AUC 0.645); at this default (every 50)
# it was rolled back at step 100 and shipped test macro 0.922. An evaluation cost 14-16 steps' time there.
EVALS_PER_RUN = 4
EVAL_EVERY_MAX = 200
# Training logits carry each market's prior log-odds offset unless told otherwise (issue 15).
DEFAULT_MARKET_PRIOR = True

_BOOL = (lambda v: isinstance(v, bool), "True or False")
# What MTL-LoRA's pull (``relevance.training.task_pull``) can pull toward, and which halves it pulls.
TASK_DECAY_TARGETS = ("identity", "mean")
TASK_DECAY_ONLY = ("lam", "mix", "both")
# What the pull moves in per-market LoRA: its A_t and B_t, toward their mean over markets (no other target).
ADAPTER_PULL = "adapter"
# Per-market LoRA's pull toward the markets' mean is off unless asked for (issue 15; README "per-market-lora"). At
# --task-decay 50, from one adapter, it took the nested policies from -0.087 macro AUC behind shared LoRA to +0.001
# (seeds 0-3), the demo's data from +0.074 to +0.129 over it (8 seeds, de's win kept) and kept its wins where
# policies cross (twins +0.217 / +0.129, es +0.010), but on the 9-market quality benchmark it did not help (macro
# 0.679 -> 0.665, jp -0.10, zh -0.09; seeds 0-1), so it is not the default yet.
DEFAULT_PML_TASK_DECAY = 0.0
# per-market-lora's markets share one adapter and each learns its departure from it (AdapterConfig.shared_adapter)
# unless told otherwise (issue 15). Independent adapters learn from ~1/T of every batch, and Adam's step on that
# noisier gradient is smaller, so with 9 markets (2 rows each of 16) they sat 0.23 macro AUC behind shared LoRA on
# the quality benchmark, pulled toward their mean or not (their mean learns no faster than they do). The shared
# adapter learns from every row (seed 1 there: macro -0.205 -> +0.001 without a pull, hi still -0.138).
DEFAULT_PML_SHARED_ADAPTER = True
# ... and each market's departure is pulled toward 0 (the shared adapter) at D × its learning rate: on that seed
# D = 40 left the agreeing markets -0.002 to -0.053 behind shared LoRA, D = 200 within -0.010 / +0.010 with the
# twins' wins (+0.107, +0.151). Against shared LoRA at D = 200: quality seeds 0-1 macro +0.027 (0.940, MTL-LoRA's
# too), nested policies seeds 0-3 +0.008, demo seeds 0-7 +0.111; crossing policies seeds 0-3 de +0.223, de-any
# +0.126 (every seed significant), es +0.008 (README "per-market-lora").
DEFAULT_PML_SHARED_DECAY = 200.0
# MTL-LoRA's pull is off unless asked for (issue 15; the README's "Pull toward shared LoRA" has the measurements).
# At --task-decay 10 on the Λ_t alone it gained the quality benchmark's agreeing markets +0.005 / +0.006 (seeds
# 0-1) and held the policy benchmarks (nested and crossing, seeds 0-3), but on the demo's data it cost seed 0
# (the seed `make demo` trains) 0.065 macro AUC, de -0.158; over seeds 0-7 there it averaged +0.001.
DEFAULT_TASK_DECAY = 0.0
# --task-decay D alone pulls the Λ_t and leaves the mixing w_t free: the crossing twins' win lives in the mixing.
DEFAULT_TASK_DECAY_ONLY = "lam"
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("r", "n_up", "batch_size", "epochs", "max_length", "eval_batch_size",
                     "keep_checkpoints"), _POS_INT),
    **dict.fromkeys(("max_steps", "eval_every", "checkpoint_every", "patience", "multilora_n", "n_experts"),
                    _OPT_POS_INT),
    **dict.fromkeys(("max_rollbacks", "head_start"), (lambda v: v is None or (_is_int(v) and v >= 0),
                                                     "a non-negative integer or None")),
    **dict.fromkeys(("alpha", "mtl_temperature", "learning_rate", "max_grad_norm", "sampling_temperature"), _POS_NUM),
    **dict.fromkeys(("weight_decay", "min_delta"), _NON_NEG),
    "mixing_init_scale": (lambda v: v is None or (_is_num(v) and v >= 0), "a non-negative number or None"),
    "task_decay": (lambda v: v is None or (_is_num(v) and v >= 0), "a non-negative number or None"),
    "task_decay_target": (lambda v: v is None or v in TASK_DECAY_TARGETS, f"one of {TASK_DECAY_TARGETS} or None"),
    "task_decay_only": (lambda v: v is None or v in TASK_DECAY_ONLY, f"one of {TASK_DECAY_ONLY} or None (the default)"),
    **dict.fromkeys(("task_lr_scale", "b_lr_ratio"), (lambda v: v is None or (_is_num(v) and v > 0),
                                                      "a positive number or None")),
    "shared_start": (lambda v: v is None or (_is_num(v) and 0 <= v < 1), "a number in [0, 1) or None"),
    **dict.fromkeys(("uniform_mixing_init", "market_prior", "shared_adapter"), (lambda v: v is None or isinstance(v, bool),
                                                             "True, False or None")),
    **dict.fromkeys(("adapter_dropout", "warmup_ratio"), _FRACTION),
    **dict.fromkeys(("track", "progress", "resume"), _BOOL),
    "seed": (_is_int, "an integer"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; bad values raise ``ValueError`` naming the field.

    ``max_steps`` (when set) overrides ``epochs``. ``patience`` counts evaluations without an
    improvement of the mean per-market valid AUC larger than ``min_delta``; ``None`` disables early
    stopping. ``max_rollbacks`` bounds the divergence guard (``relevance.training.divergence``; ``None``:
    its default, 0: off). ``sampling_temperature`` applies to ``sampling="temperature"`` (p_t ∝ n_t^(1/T)).
    ``multilora_n`` (MultiLoRA's parallel LoRAs) and ``n_experts`` (MOELoRA's experts, a divisor of
    ``r``) default to ``None``, meaning the adapter library's default (3 and 4): a ``None`` default
    keeps runs written before these fields existed resumable (a missing key reads as ``None``).
    ``task_decay`` (MTL-LoRA and per-market LoRA; ``None``/0: off by default) pulls each market's trainable parameters
    after every step, by ``task_decay`` × their group's learning rate, toward ``task_decay_target``: ``identity``
    (``None``; Λ_t toward I, the mixing toward uniform) or ``mean`` (toward the layer's mean over markets; per-market
    LoRA's A_t, B_t only this). ``task_decay_only`` says which of MTL-LoRA's: ``lam`` (``None``) the Λ_t, ``mix``
    the mixing logits w_t, ``both`` both (``relevance.training.task_pull``).
    """

    data: str
    method: str
    base_model: str
    out: str
    markets: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 16.0
    n_up: int = 3
    mtl_temperature: float = 0.1
    uniform_mixing_init: bool | None = None
    mixing_init_scale: float | None = None
    task_lr_scale: float | None = None
    task_decay: float | None = None
    task_decay_target: str | None = None
    task_decay_only: str | None = None
    b_lr_ratio: float | None = None
    shared_start: float | None = None
    shared_adapter: bool | None = None
    market_prior: bool | None = None
    head_start: int | None = None
    multilora_n: int | None = None
    n_experts: int | None = None
    adapter_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 128
    sampling: str = "proportional"
    sampling_temperature: float = 2.0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    patience: int | None = None
    min_delta: float = 0.0
    max_rollbacks: int | None = None
    eval_batch_size: int = 128
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    tracking_uri: str | None = None
    experiment: str = "ads-relevance"
    run_name: str | None = None
    track: bool = True
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "base_model", "out"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
            elif not isinstance(value, str) or not value:
                _bad(name, value, "a non-empty path")
        _choice("method", self.method, METHODS)
        _choice("sampling", self.sampling, SAMPLING)
        _choice("precision", self.precision, PRECISIONS)
        for name in ("markets", "target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                    _bad(name, value, "a tuple of non-empty strings or None")
                object.__setattr__(self, name, tuple(value))
        if self.markets is not None:
            if not self.markets:
                _bad("markets", self.markets, "at least one market code, or None for all")
            for code in self.markets:
                try:
                    validate_market(code)
                except ValueError as exc:
                    _bad("markets", self.markets, str(exc))
        for name, (ok, expected) in _RULES.items():
            if not ok(getattr(self, name)):
                _bad(name, getattr(self, name), expected)
        if self.head_start and self.modules_to_save is not None and "classifier" not in self.modules_to_save:
            _bad("head_start", self.head_start, f"None or 0 when modules_to_save {list(self.modules_to_save)} leaves "
                 "out 'classifier': the probed classifier would not be saved with the adapter, so the exported "
                 "model would score with another head. Add classifier to --modules-to-save or drop --head-start")
        if self.task_decay and self.method not in ("mtl-lora", "per-market-lora"):
            _bad("task_decay", self.task_decay, f"None or 0 for method {self.method!r}: only mtl-lora (its Λ_t and "
                 "w_t) and per-market-lora (its A_t and B_t) have per-market parameters to pull")
        if self.shared_adapter and self.method != "per-market-lora":
            _bad("shared_adapter", self.shared_adapter, f"None or False for method {self.method!r}: only "
                 "per-market-lora has per-market adapters to add a shared one to")
        if self.method == "per-market-lora" and self.task_decay_target is not None and self.uses_shared_adapter:
            _bad("task_decay_target", self.task_decay_target, "None for per-market-lora with its shared adapter: the "
                 "pull moves each market's departure ΔA_t, ΔB_t toward 0, i.e. toward the shared adapter")
        if self.method == "per-market-lora" and self.task_decay_target not in (None, "mean"):
            _bad("task_decay_target", self.task_decay_target, "None or 'mean' for per-market-lora: its A_t and B_t "
                 "have no neutral value but the markets' mean")
        if self.method == "per-market-lora" and self.task_decay_only is not None:
            _bad("task_decay_only", self.task_decay_only, "None for per-market-lora: the pull moves its A_t and "
                 "B_t together (--task-decay-only picks MTL-LoRA's Λ_t or w_t)")
        if self.shared_start and self.uses_shared_adapter:
            _bad("shared_start", self.shared_start, "None or 0 with per-market-lora's shared adapter, whose markets "
                 "start as one adapter anyway: add --no-shared-adapter to give independent adapters a shared start")
        if self.shared_start and self.method != "per-market-lora":
            _bad("shared_start", self.shared_start, "None or 0 for method "
                 f"{self.method!r}: only per-market-lora has per-market adapters that can start shared")

    def task_lr_multiplier(self, n_markets: int) -> float | None:
        """Learning-rate factor of each market's own adapter parameters (``relevance.training.optim``) when
        ``n_markets`` markets train: MTL-LoRA's Λ_t and w_t (``task_lr_scale`` if given, else max(3, n_markets)),
        per-market LoRA's A_t and B_t (``task_lr_scale`` if given, else PER_MARKET_LORA_LR_SCALE); None for
        methods that have no such parameters in shared batches."""
        if self.method not in ("mtl-lora", "per-market-lora"):
            return None
        if self.task_lr_scale is not None:
            return float(self.task_lr_scale)
        if self.method == "per-market-lora":
            return PER_MARKET_LORA_LR_SCALE
        return max(DEFAULT_TASK_LR_SCALE, float(n_markets))

    def eval_interval(self, total_steps: int) -> int:
        """Steps between valid evaluations: ``eval_every`` if given, else a quarter of ``total_steps`` (at
        least 1, at most EVAL_EVERY_MAX), so the divergence guard has earlier weights to go back to."""
        if self.eval_every is not None:
            return self.eval_every
        return min(EVAL_EVERY_MAX, max(1, math.ceil(total_steps / EVALS_PER_RUN)))

    def b_lr_multiplier(self, n_markets: int) -> float:
        """LoRA+'s η_B / η_A for every method's up-projections B when ``n_markets`` markets train:
        ``b_lr_ratio`` if given, else max(1, B_LR_BUDGET / max(3, n_markets)), the same for every method."""
        if self.b_lr_ratio is not None:
            return float(self.b_lr_ratio)
        return max(1.0, B_LR_BUDGET / max(DEFAULT_TASK_LR_SCALE, float(n_markets)))

    @property
    def task_decay_rate(self) -> float:
        """D of the pull (``relevance.training.task_pull``): ``task_decay`` if given, else DEFAULT_TASK_DECAY
        (MTL-LoRA) or DEFAULT_PML_TASK_DECAY (per-market LoRA); 0 (off) for the other methods, which have no
        per-market parameters."""
        if self.method == "per-market-lora":
            if self.task_decay is not None:
                return float(self.task_decay)
            return DEFAULT_PML_SHARED_DECAY if self.uses_shared_adapter else DEFAULT_PML_TASK_DECAY
        if self.method != "mtl-lora":
            return 0.0
        return DEFAULT_TASK_DECAY if self.task_decay is None else float(self.task_decay)

    @property
    def task_decay_halves(self) -> str:
        """What the pull moves: MTL-LoRA's ``lam``, ``mix`` or ``both``; per-market LoRA's A_t, B_t (``adapter``)."""
        if self.method == "per-market-lora":
            return ADAPTER_PULL
        return self.task_decay_only or DEFAULT_TASK_DECAY_ONLY

    @property
    def task_decay_toward(self) -> str:
        """Where the pull moves them: ``task_decay_target`` (MTL-LoRA's default ``identity``); per-market
        LoRA's A_t, B_t toward their ``mean``, or with its shared adapter their departures ΔA_t, ΔB_t toward
        their neutral value 0 (``identity``: the shared adapter)."""
        if self.method == "per-market-lora":
            return "identity" if self.uses_shared_adapter else "mean"
        return self.task_decay_target or "identity"

    @property
    def uses_shared_adapter(self) -> bool:
        """Whether per-market-lora's A_t, B_t are a shared adapter plus each market's departure
        (``AdapterConfig.shared_adapter``): ``shared_adapter`` if given, else DEFAULT_PML_SHARED_ADAPTER;
        False for every other method (``separate`` included: one model per market shares nothing)."""
        if self.method != "per-market-lora":
            return False
        return DEFAULT_PML_SHARED_ADAPTER if self.shared_adapter is None else self.shared_adapter

    @property
    def pull_record(self) -> dict[str, float | str | None]:
        """The pull as ``run_info.json`` records it: its D (0: off) and the halves it moves (None when off)."""
        rate = self.task_decay_rate
        return {"task_decay": rate, "task_decay_only": self.task_decay_halves if rate else None}

    @property
    def rollback_limit(self) -> int:
        """How many times a collapsed run may go back to its best weights (``relevance.training.divergence``)."""
        from relevance.training.divergence import DEFAULT_MAX_ROLLBACKS

        return DEFAULT_MAX_ROLLBACKS if self.max_rollbacks is None else self.max_rollbacks

    @property
    def shared_start_fraction(self) -> float:
        """Fraction of the steps in which per-market-lora's markets share one adapter (0 for other methods)."""
        if self.method != "per-market-lora":
            return 0.0
        return DEFAULT_SHARED_START if self.shared_start is None else float(self.shared_start)

    @property
    def uses_market_prior(self) -> bool:
        """Whether training logits get each market's prior offset (``relevance.training.priors``).

        Off by default for ``separate``: each market's own head bias fits its base rate, and an offset
        taken against the pooled rate would let one market's labels move another market's training.
        """
        if self.market_prior is None:
            return DEFAULT_MARKET_PRIOR and not self.separate
        return self.market_prior

    @property
    def separate(self) -> bool:
        """True for ``separate``: per-market LoRA *and* head, each step on one market's rows only."""
        return self.method == "separate"

    @property
    def market_token(self) -> bool:
        """True when the query carries the market prefix (``lora-market-token``)."""
        return self.method == "lora-market-token"

    @property
    def temperature(self) -> float:
        """The sampler's T: 1 for proportional sampling."""
        return self.sampling_temperature if self.sampling == "temperature" else 1.0

    def adapter_config(self, markets: tuple[str, ...]):
        """The adapter library's config for this method (``lora-market-token`` is a shared ``lora``;
        ``separate`` is ``per-market-lora``, whose head copies the training loop adds)."""
        from relevance.model.adapters import AdapterConfig

        extra: dict[str, Any] = {}
        if self.target_modules is not None:
            extra["target_modules"] = self.target_modules
        if self.modules_to_save is not None:
            extra["modules_to_save"] = self.modules_to_save
        for name in ("multilora_n", "n_experts", "uniform_mixing_init", "mixing_init_scale"):
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        if self.uses_shared_adapter:
            extra["shared_adapter"] = True
        method = {"lora-market-token": "lora", "separate": "per-market-lora"}.get(self.method, self.method)
        return AdapterConfig(method, markets=tuple(markets), r=self.r, alpha=self.alpha, n_up=self.n_up,
                             temperature=self.mtl_temperature, dropout=self.adapter_dropout, **extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists); :meth:`from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _bad(name: str, value: object, expected: str) -> None:
    raise ValueError(f"TrainConfig.{name}={value!r} is invalid: expected {expected}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _bad(name, value, f"one of {list(allowed)}")
