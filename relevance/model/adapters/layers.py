"""Adapter layers: a frozen ``nn.Linear`` plus a low-rank update (DESIGN.md §4).

Shapes below: B batch, L any middle dims flattened (tokens), d_in / d_out the wrapped layer's
features, r rank, n number of up-projections (MTL-LoRA), T number of tasks (markets).

The update is added to the base output inside the rank-r GEMM (``addmm``/``baddbmm`` with beta=1)
rather than by a separate ``out + Δ``: one fewer pass over the (B·L × d_out) activation per adapted
layer, which is most of what an adapter costs beyond its two thin matmuls.

Per-task parameters (Λ_t, w_t, per-market A_t/B_t) are separate ``Parameter`` objects in a
``ParameterList`` rather than rows of one tensor, so that freezing is per market: an optimizer
(weight decay included) can never move a frozen market's numbers (``train_new_markets_only``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mixing import mix_up_projections


def _kaiming(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """nn.Linear's (and PEFT's) default init: Kaiming-uniform with a=√5, i.e. U(±1/√fan_in)."""
    t = torch.empty(shape, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def list_items(params: nn.ParameterList) -> Iterator[nn.Parameter]:
    """A ParameterList's parameters in index order, from the dict every module keeps its own parameters in
    (the list registers item i under the name "i"). Iterating the list goes through a module ``__getattr__``
    per item: 0.86 ms for e5-small's 48 lists of 7 markets against 0.02 ms, and a training forward reads
    each list twice (2-core AMX Xeon); per-market LoRA and MOELoRA read theirs once a training forward."""
    return iter(params._parameters.values())  # type: ignore[arg-type]  # values are Parameters, never None


class AdapterLayer(nn.Module):
    """Shared machinery: frozen base, dropout on the adapter input, task routing, merge state.

    ``_task_ids`` (LongTensor (B,)) is instance state set only by ``use_tasks`` for the duration of
    a forward; ``merged_task`` records which delta is folded into ``base.weight`` (``merge``).
    """

    task_conditioned: ClassVar[bool] = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapter layers wrap nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._dropout_p = dropout
        self._task_ids: Tensor | None = None
        self.is_merged = False
        self.merged_task: int | None = None
        self._cache: tuple[tuple[object, ...], tuple[Tensor, ...]] | None = None

    # -- overridden per method --------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        """Return ``out + Δ(x)`` (x already dropped out), ``out`` = base output of the same rows."""
        raise NotImplementedError

    def delta_weight(self, task: int | None = None) -> Tensor:
        """ΔW (d_out × d_in) for ``task``, such that the adapted layer equals W + ΔW for it."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def _per_task(self, compute: Callable[[], tuple[Tensor, ...]], dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Per-task matrices, reused across forwards while no gradient is needed (scoring).

        The key holds every parameter's storage address and in-place version counter, so an
        optimizer step, ``load_adapter``, ``merge`` or ``.to()`` invalidates it. Why the version
        counter is safe to rely on although it is spelled ``_version``: it is the counter autograd
        itself uses to detect in-place changes of saved tensors, so every in-place kernel (the
        optimizers' foreach kernels included) must bump it or autograd would be wrong; a new storage
        (``.to()``, ``load_state_dict`` with ``assign``) changes ``data_ptr``. PyTorch has no public
        equivalent. Tested with a real optimizer step in ``test_adapter_layers``.
        """
        if torch.is_grad_enabled():
            self._cache = None
            return tuple(t.to(dtype) for t in compute())
        key = (dtype, *((p.data_ptr(), p._version) for p in self.parameters()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, tuple(t.to(dtype) for t in compute()))
        return self._cache[1]

    def _check_task(self, task: int | None) -> int:
        if not self.task_conditioned:
            return 0
        if task is None or isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(
                f"{type(self).__name__}.delta_weight needs a task index in [0, {self.num_tasks}), "
                f"got {task!r}"
            )
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task index {task} out of range: this layer has {self.num_tasks} tasks")
        return task

    def _ids_for(self, x: Tensor) -> Tensor:
        ids = self._task_ids
        if ids is None:
            raise ValueError(
                f"{type(self).__name__} is task-conditioned and needs per-example task ids "
                f"(LongTensor of shape ({x.shape[0]},)): run the forward inside "
                "`with use_tasks(model, task_ids):`"
            )
        if ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"{ids.shape[0]} task ids for a batch of {x.shape[0]} examples: expected one id per "
                "example (dim 0 of the input)"
            )
        return ids if ids.device == x.device else ids.to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_merged:
            ids = self._task_ids
            if self.task_conditioned and ids is not None and bool((ids != self.merged_task).any()):
                raise ValueError(
                    f"layer is merged for task {self.merged_task} but the batch has task ids "
                    f"{sorted(set(ids.tolist()))}: unmerge(model) to serve several markets"
                )
            return self.base(x)
        out = self.base(x)
        if self.training and self._dropout_p > 0:
            x = self.dropout(x)
        return self._update(x, out)

    @torch.no_grad()
    def merge(self, task: int | None = None) -> None:
        """Fold ΔW_task into ``base.weight`` in place (inference with a plain linear's cost)."""
        if self.is_merged:
            raise ValueError(f"layer already merged for task {self.merged_task}: unmerge first")
        task = self._check_task(task)
        w = self.base.weight
        w.add_(self.delta_weight(task).to(torch.float32).to(w.dtype))
        self.is_merged, self.merged_task = True, task

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged ΔW again (exact up to float rounding); no-op when not merged."""
        if not self.is_merged:
            return
        w = self.base.weight
        w.sub_(self.delta_weight(self.merged_task).to(torch.float32).to(w.dtype))
        self.is_merged, self.merged_task = False, None

    def add_task(self) -> int:
        """Append a new task's parameters, initialised so its update starts neutral; return its index."""
        raise ValueError(f"{type(self).__name__} has no per-task parameters: a market cannot be added")

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """The parameters owned by ``task`` alone (trained in new-markets-only mode)."""
        return []

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, tasks={self.num_tasks}"


class LoRALinear(AdapterLayer):
    """Shared LoRA: ``h = W x + (α/r) · B A x`` for every example, task ids ignored.

    A: (r, d_in) Kaiming-uniform; B: (d_out, r) zeros, so the adapted model starts as the base.
    """

    task_conditioned = False

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.lora_A = nn.Parameter(_kaiming((r, self.in_features), w))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))

    @property
    def num_tasks(self) -> int:
        return 1

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        z = F.linear(x, self.lora_A)  # (..., r)
        b_scaled = (self.lora_B * self.scaling).to(z.dtype)  # (d_out, r)
        fused = torch.addmm(out.reshape(-1, self.out_features), z.reshape(-1, self.r), b_scaled.t())
        return fused.view(out.shape)  # (..., d_out)

    def delta_weight(self, task: int | None = None) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (d_out, d_in)


class PerTaskLoRALinear(AdapterLayer):
    """Per-market LoRA: ``h = W x + (α/r) · B_t A_t x`` with A_t, B_t per task t.

    Independent (the paper's per-task baseline): A_t (r, d_in) Kaiming-uniform, B_t (d_out, r) zeros.
    With ``shared=True`` each market's pair is a shared adapter plus the market's own departure,
    ``A_t = Ā + ΔA_t``, ``B_t = B̄ + ΔB_t``: Ā Kaiming, B̄ and every ΔA_t, ΔB_t zeros (``lora_A``/``lora_B``
    then hold the Δ, ``shared.lora_A``/``shared.lora_B`` the Ā, B̄). Why: Ā, B̄ get gradient from every row
    of a batch, so they learn at shared LoRA's pace, while a market's own pair sees ~1/T of it; Adam's step
    on that noisier gradient is smaller (issue 15: 9 markets, 2 rows each per batch of 16). Every example
    gathers its own pair.
    """

    def __init__(
        self, base: nn.Linear, num_tasks: int, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
        shared: bool = False,
    ) -> None:
        super().__init__(base, r, alpha, dropout)
        self.lora_A = nn.ParameterList()  # T × (r, d_in)
        self.lora_B = nn.ParameterList()  # T × (d_out, r)
        self.shared: nn.Module | None = None
        if shared:
            w = base.weight
            self.shared = nn.Module()
            self.shared.lora_A = nn.Parameter(_kaiming((r, self.in_features), w))  # Ā (r, d_in)
            self.shared.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        for _ in range(num_tasks):
            self.add_task()

    @property
    def num_tasks(self) -> int:
        return len(self.lora_A)

    def add_task(self) -> int:
        """A new market: its own Kaiming A_t and zero B_t, or (shared) zero departures, i.e. the shared adapter."""
        w = self.base.weight
        zeros = {"device": w.device, "dtype": w.dtype}
        a = torch.zeros(self.r, self.in_features, **zeros) if self.shared else _kaiming((self.r, self.in_features), w)
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.r, **zeros)))
        return len(self.lora_A) - 1

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.lora_A[task], self.lora_B[task]]

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        ids = self._ids_for(x)
        b = x.shape[0]
        xb = x.reshape(b, -1, self.in_features)  # (B, L, d_in)
        a, bb = self._per_task(self._stacked, x.dtype)  # (T, r, d_in), (T, d_out, r) scaled
        z = torch.bmm(xb, a.index_select(0, ids).transpose(1, 2))  # (B, L, r)
        fused = torch.baddbmm(
            out.reshape(b, -1, self.out_features), z, bb.index_select(0, ids).transpose(1, 2)
        )  # (B, L, d_out)
        return fused.view(out.shape)

    def _stacked(self) -> tuple[Tensor, Tensor]:
        a = torch.stack(tuple(list_items(self.lora_A)))  # (T, r, d_in)
        b = torch.stack(tuple(list_items(self.lora_B)))  # (T, d_out, r)
        if self.shared is not None:
            a, b = a + self.shared.lora_A, b + self.shared.lora_B
        return a, b * self.scaling

    def task_pair(self, task: int) -> tuple[Tensor, Tensor]:
        """Market ``task``'s effective (A_t (r, d_in), B_t (d_out, r)), the shared adapter's part included."""
        a, b = self.lora_A[task], self.lora_B[task]
        if self.shared is not None:
            a, b = a + self.shared.lora_A, b + self.shared.lora_B
        return a, b

    def delta_weight(self, task: int | None = None) -> Tensor:
        a, b = self.task_pair(self._check_task(task))
        return (b @ a) * self.scaling  # (d_out, d_in)


class MTLLoRALinear(AdapterLayer):
    """MTL-LoRA: ``h = W x + (α/r) · Σ_i p_t,i · B_i Λ_t A x``, ``p_t = softmax(w_t / τ)``.

    A: (r, d_in) shared, Kaiming-uniform. B: (n, d_out, r) zeros. Λ_t: (r, r) per task, identity.
    w_t: (n,) per task, U(±s/√n); s = ``mixing_init_scale`` (s = 1 is the reference code's
    Kaiming-uniform on (T, n), near one-hot at τ = 0.1; s = 0, or ``uniform_mixing_init``, is p_t
    uniform, where the B_i stay identical and w_t gets no gradient). Vectorised as M_t = (α/r)(Σ_i p_t,i B_i) Λ_t, computed
    once per forward for all tasks, then one batched product per example: h = W x + M_{t(b)} (A x).
    In training, ``use_tasks`` computes M for all layers of one shape in one pass (``task_batch.py``).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        r: int = 8,
        alpha: float = 16.0,
        n_up: int = 3,
        temperature: float = 0.1,
        dropout: float = 0.0,
        uniform_mixing_init: bool = False,
        mixing_init_scale: float = 0.1,
    ) -> None:
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.n_up = n_up
        self.temperature = temperature
        self.uniform_mixing_init = uniform_mixing_init
        self.mixing_init_scale = 0.0 if uniform_mixing_init else mixing_init_scale
        self.lora_A = nn.Parameter(_kaiming((r, self.in_features), w))  # (r, d_in)
        self.lora_B = nn.Parameter(
            torch.zeros(n_up, self.out_features, r, device=w.device, dtype=w.dtype)
        )  # (n, d_out, r)
        self.lam = nn.ParameterList()  # T × (r, r)
        self.mix_logits = nn.ParameterList()  # T × (n,)
        self._task_batch: tuple[object, int] | None = None  # (TaskMatrixBatch, index), set by use_tasks
        for _ in range(num_tasks):
            self._append_task(neutral=uniform_mixing_init)

    @property
    def num_tasks(self) -> int:
        return len(self.lam)

    def _append_task(self, neutral: bool) -> int:
        w = self.base.weight
        self.lam.append(nn.Parameter(torch.eye(self.r, device=w.device, dtype=w.dtype)))
        logits = torch.zeros(self.n_up, device=w.device, dtype=w.dtype)
        if not neutral and self.mixing_init_scale > 0:
            bound = self.mixing_init_scale / math.sqrt(self.n_up)
            logits.uniform_(-bound, bound)
        self.mix_logits.append(nn.Parameter(logits))
        return len(self.lam) - 1

    def add_task(self) -> int:
        """New task: Λ = I and zero (neutral) mixing logits, so p is uniform over the B_i."""
        return self._append_task(neutral=True)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.lam[task], self.mix_logits[task]]

    def mixing_weights(self) -> Tensor:
        """p: (T, n) = softmax(w / τ) row-wise."""
        return torch.softmax(torch.stack(tuple(list_items(self.mix_logits))) / self.temperature, dim=-1)

    def task_matrices(self) -> Tensor:
        """M: (T, d_out, r) with M_t = (α/r) (Σ_i p_t,i B_i) Λ_t.

        One batched product over the markets (``bmm``), not one small product per market: under
        bf16 autocast the per-market loop was 3 ops per market per adapted layer (two casts and a
        matmul, then as many in backward), which left MTL-LoRA's training step at 2.9x shared LoRA's
        on an H200 (launch-bound) and at 0.93x its examples/s on a 2-core AMX CPU. Row t is the
        same arithmetic whatever T is, so adding a market cannot change an existing one's bits
        (``test_adapter_growth``). The mix Σ_i p_t,i B_i is elementwise in forward for the same reason
        (``mixing``: a product's rows moved with T on an AVX2 CPU) and products in backward.
        """
        return stacked_task_matrices([self])[0]

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        ids = self._ids_for(x)
        b = x.shape[0]
        z = F.linear(x, self.lora_A).reshape(b, -1, self.r)  # (B, L, r)
        if self._task_batch is not None and torch.is_grad_enabled():  # training: every layer's at once
            self._cache = None  # as _per_task does under grad: a training step drops the scoring cache
            batch, index = self._task_batch
            m_all = batch.matrices(index, z.dtype)  # type: ignore[attr-defined]  # (T, d_out, r)
        else:
            (m_all,) = self._per_task(lambda: (self.task_matrices(),), z.dtype)  # (T, d_out, r)
        m = m_all.index_select(0, ids)  # (B, d_out, r)
        fused = torch.baddbmm(out.reshape(b, -1, self.out_features), z, m.transpose(1, 2))
        return fused.view(out.shape)  # (B, L, d_out)

    def delta_weight(self, task: int | None = None) -> Tensor:
        t = self._check_task(task)
        return self.task_matrices()[t] @ self.lora_A  # (d_out, d_in)


def stacked_task_matrices(layers: list[MTLLoRALinear]) -> Tensor:
    """(G, T, d_out, r): layer g's M_t (``MTLLoRALinear.task_matrices``), for G layers of one shape and
    temperature, rank and scaling (``task_batch``'s grouping); G = 1 is one layer's own computation."""
    first = layers[0]
    g, t, n = len(layers), first.num_tasks, first.n_up
    d_out, r = first.out_features, first.r
    logits = torch.stack([w for layer in layers for w in list_items(layer.mix_logits)]).view(g, t, n)
    p = torch.softmax(logits / first.temperature, dim=-1) * first.scaling  # (G, T, n), α/r folded in
    b = torch.stack([layer.lora_B for layer in layers])  # (G, n, d_out, r)
    # The mix elementwise forward, as products backward (``mixing``: rows rounded alike for any T), not a
    # broadcast multiply and sum over a (G, T, n, d_out, r) temporary: that temporary and its backward were
    # ~9 ms of a 2-core CPU's training step (e5-small, 7 markets). In the parameters' precision: autocast
    # would round p and B to bf16 first.
    with torch.autocast(b.device.type, enabled=False):
        b_mix = mix_up_projections(p, b.view(g, n, d_out * r))  # (G, T, d_out·r)
    lam = torch.stack([x for layer in layers for x in list_items(layer.lam)])  # (G·T, r, r)
    m = torch.bmm(b_mix.view(g * t, d_out, r), lam)  # (G·T, d_out, r)
    return m.view(g, t, d_out, r)
