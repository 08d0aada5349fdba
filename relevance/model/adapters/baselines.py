"""The MTL-LoRA paper's multi-task baselines as adapter layers: MultiLoRA and MOELoRA.

Same layer API as :mod:`.layers` (one ``delta_weight(task)`` used by merge and export, vectorised
forward, updates fused into the base output with ``addmm``/``baddbmm``). Shapes: B batch, L middle
dims flattened (tokens), d_in / d_out the wrapped layer's features, r total rank, n parallel LoRAs
(MultiLoRA), N experts of rank r/N (MOELoRA), T tasks (markets), e task-embedding size.

Both layers are written as one rank-r (MultiLoRA: rank n·r) LoRA whose up-projection columns are
scaled, which is what makes them cheap: Σ_i s_i ⊙ (B_i A_i x) = [diag(s_1)B_1 | … | diag(s_n)B_n]
[A_1; …; A_n] x, and Σ_i g_i B_i A_i x = [g_1 B_1 | … | g_N B_N] [A_1; …; A_N] x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AdapterLayer, _kaiming, list_items


class MultiLoRALinear(AdapterLayer):
    """MultiLoRA: ``h = W x + (α/r) · Σ_{i=1..n} s_i ⊙ (B_i A_i x)``, task ids ignored.

    A_i: (r, d_in) Kaiming-uniform; B_i: (d_out, r) Kaiming-uniform (U(±1/√r)); s_i: (d_out,)
    learnable per-output-channel scales, zeros. Stored stacked: A (n, r, d_in), B (n, d_out, r),
    s (n, d_out).

    Why B is random and s zero: with B_i = 0 *and* s_i = 0 every gradient vanishes (∂/∂B carries a
    factor s, ∂/∂s a factor B A x) and nothing would ever train. The MultiLoRA paper changes LoRA's
    initialisation exactly here, and its reference code (as in the MTL-LoRA authors' baseline code)
    initialises B_i Kaiming-uniform and s_i to zero: the layer still starts as the base model (s = 0),
    the first step moves s (its gradient is the non-zero B_i A_i x), and from then on A_i and B_i get
    gradients too. The alternative (B = 0, s = 1) would make it a plain n-way LoRA at the start,
    the very parameter dependency the paper's init is meant to break.
    """

    task_conditioned = False

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, n: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.n = n
        self.lora_A = nn.Parameter(torch.stack([_kaiming((r, self.in_features), w) for _ in range(n)]))
        self.lora_B = nn.Parameter(torch.stack([_kaiming((self.out_features, r), w) for _ in range(n)]))
        self.lora_scale = nn.Parameter(torch.zeros(n, self.out_features, device=w.device, dtype=w.dtype))

    @property
    def num_tasks(self) -> int:
        return 1

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """A_cat: (n·r, d_in) = [A_1; …; A_n]; M: (d_out, n·r) = (α/r)[diag(s_1)B_1 | … | diag(s_n)B_n]."""
        a = self.lora_A.reshape(self.n * self.r, self.in_features)  # (n·r, d_in)
        m = self.lora_scale.unsqueeze(-1) * self.lora_B  # (n, d_out, r)
        m = m.permute(1, 0, 2).reshape(self.out_features, self.n * self.r)  # (d_out, n·r)
        return a, m * self.scaling

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        a, m = self._stacked()
        z = F.linear(x, a.to(x.dtype))  # (..., n·r)
        fused = torch.addmm(
            out.reshape(-1, self.out_features), z.reshape(-1, self.n * self.r), m.to(z.dtype).t()
        )
        return fused.view(out.shape)  # (..., d_out)

    def delta_weight(self, task: int | None = None) -> Tensor:
        """(α/r) Σ_i diag(s_i) B_i A_i: (d_out, d_in), the same for every market."""
        a, m = self._stacked()
        return m @ a

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}"


class MoELoRALinear(AdapterLayer):
    """MOELoRA: ``h = W x + (α/r) · Σ_i g_t,i B_i A_i x``, ``g_t = softmax(W_g · emb[t])``.

    N experts of rank r/N: A_i (r/N, d_in) ~ N(0, 0.01²) (std 0.01), B_i (d_out, r/N) zeros, stored
    as A (N, r/N, d_in), B (N, d_out, r/N). emb[t]: (e,) per task, N(0, 1) as ``nn.Embedding``;
    W_g: (N, e) shared, Kaiming-uniform as a bias-free ``nn.Linear(e, N)``. Both gate factors are
    random: were either zero, the other would get no gradient at the first step. The layer starts as
    the base (B = 0); the first step moves B, the next ones A, emb and W_g as well.

    Vectorised as M_t = (α/r) [g_t,1 B_1 | … | g_t,N B_N] (T, d_out, r), computed once per forward,
    then one batched product per example: h = W x + M_{t(b)} ([A_1; …; A_N] x).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_tasks: int,
        r: int = 8,
        alpha: float = 16.0,
        n_experts: int = 4,
        task_dim: int = 64,
        dropout: float = 0.0,
    ) -> None:
        if r % n_experts:
            raise ValueError(f"n_experts={n_experts} must divide r={r}: each expert has rank r / n_experts")
        super().__init__(base, r, alpha, dropout)
        w = base.weight
        self.n_experts = n_experts
        self.expert_r = r // n_experts
        self.task_dim = task_dim
        a = torch.empty(n_experts, self.expert_r, self.in_features, device=w.device, dtype=w.dtype)
        self.lora_A = nn.Parameter(a.normal_(0.0, 0.01))  # (N, r/N, d_in)
        self.lora_B = nn.Parameter(
            torch.zeros(n_experts, self.out_features, self.expert_r, device=w.device, dtype=w.dtype)
        )  # (N, d_out, r/N)
        self.gate = nn.Parameter(_kaiming((n_experts, task_dim), w))  # (N, e)
        self.task_emb = nn.ParameterList()  # T × (e,)
        for _ in range(num_tasks):
            emb = torch.empty(task_dim, device=w.device, dtype=w.dtype).normal_()
            self.task_emb.append(nn.Parameter(emb))

    @property
    def num_tasks(self) -> int:
        return len(self.task_emb)

    def add_task(self) -> int:
        """New task: a zero embedding, so its gate is uniform (an even mix of the trained experts)."""
        w = self.base.weight
        self.task_emb.append(nn.Parameter(torch.zeros(self.task_dim, device=w.device, dtype=w.dtype)))
        return len(self.task_emb) - 1

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        return [self.task_emb[task]]

    def gates(self) -> Tensor:
        """g: (T, N) = softmax(emb · W_gᵀ) row-wise.

        A broadcast product and sum rather than a matmul, so that row t is the same arithmetic
        whatever T is: adding a market cannot change an existing one's bits.
        """
        emb = torch.stack(tuple(list_items(self.task_emb)))  # (T, e)
        logits = (emb.unsqueeze(1) * self.gate.unsqueeze(0)).sum(-1)  # (T, N)
        return torch.softmax(logits, dim=-1)

    def task_matrices(self) -> Tensor:
        """M: (T, d_out, r) with M_t = (α/r) [g_t,1 B_1 | … | g_t,N B_N]."""
        g = self.gates()  # (T, N)
        m = g[:, :, None, None] * self.lora_B.unsqueeze(0)  # (T, N, d_out, r/N)
        m = m.permute(0, 2, 1, 3).reshape(-1, self.out_features, self.r)  # (T, d_out, r)
        return m * self.scaling

    def _a_cat(self) -> Tensor:
        return self.lora_A.reshape(self.r, self.in_features)  # (r, d_in) = [A_1; …; A_N]

    def _update(self, x: Tensor, out: Tensor) -> Tensor:
        ids = self._ids_for(x)
        b = x.shape[0]
        z = F.linear(x, self._a_cat().to(x.dtype)).reshape(b, -1, self.r)  # (B, L, r)
        (m_all,) = self._per_task(lambda: (self.task_matrices(),), z.dtype)  # (T, d_out, r)
        m = m_all.index_select(0, ids)  # (B, d_out, r)
        fused = torch.baddbmm(out.reshape(b, -1, self.out_features), z, m.transpose(1, 2))
        return fused.view(out.shape)  # (B, L, d_out)

    def delta_weight(self, task: int | None = None) -> Tensor:
        """(α/r) Σ_i g_t,i B_i A_i: (d_out, d_in) for market ``task``."""
        t = self._check_task(task)
        return self.task_matrices()[t] @ self._a_cat()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.n_experts}x{self.expert_r}, e={self.task_dim}"
