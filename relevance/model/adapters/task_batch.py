"""MTL-LoRA's per-task matrices for all adapted layers of one shape at once, once per training forward.

Why: each layer's M_t = (α/r)(Σ_i p_t,i B_i) Λ_t (:meth:`MTLLoRALinear.task_matrices`) is a handful of
small ops (stack, softmax, mix, bmm, scale) and as many again in backward. Over e5-small's 48 adapted
layers that is ~1,000 tiny ops a training step, most of what MTL-LoRA cost beyond shared LoRA on a 2-core
CPU. Layers of one shape run the same ops on same-shaped tensors, so they are stacked and computed in
one pass: the same products per matrix, ~10 ops a step instead of ~10 per layer.

Only while gradients flow (training): scoring reuses each layer's own cached matrices
(``AdapterLayer._per_task``). ``use_tasks`` sets the batches up; a forward pre-hook on the model clears
them, so every forward builds its own graph (a graph is never shared by two backward passes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .layers import MTLLoRALinear, list_items, stacked_task_matrices


def _shape_key(layer: MTLLoRALinear) -> tuple[object, ...]:
    w = layer.lora_B  # the shapes and constants stacked_task_matrices assumes alike
    return (layer.out_features, layer.r, layer.n_up, layer.num_tasks, layer.temperature, layer.scaling,
            w.device, w.dtype)


class TaskMatrixBatch:
    """The layers of one shape; their matrices computed once a forward, by the model's pre-hook."""

    def __init__(self, layers: list[MTLLoRALinear]) -> None:
        self.layers = layers
        # The parameters M depends on, listed once: walking each layer's modules (``parameters()``) twice a
        # forward over e5-small's 48 layers cost ~2 ms of a 2-core CPU's step. A batch lives for one
        # ``use_tasks`` context, inside which no market is added.
        self._params = [(layer.lora_B, *list_items(layer.lam), *list_items(layer.mix_logits)) for layer in layers]
        self._slices: tuple[Tensor, ...] | None = None  # unbind: one backward op stacks every layer's grad
        self._versions: list[tuple[int, ...]] = []  # each layer's parameter versions when computed

    def clear(self) -> None:
        self._slices, self._versions = None, []

    def prepare(self) -> None:
        """Compute now, from the model's forward pre-hook: outside any checkpointed block, whose re-run in
        backward must save the same tensors as its first run (a lazy first request inside it would not)."""
        self._slices = stacked_task_matrices(self.layers).unbind(0)
        self._versions = [tuple(p._version for p in params) for params in self._params]

    def matrices(self, index: int, dtype: torch.dtype) -> Tensor:
        """(T, d_out, r) of ``self.layers[index]`` in ``dtype``.

        Recomputed when the layer's parameters changed in place since (an optimizer step between two
        forwards that the model's pre-hook did not see, e.g. a submodule called directly): the same
        version-counter test as ``AdapterLayer._per_task``.
        """
        versions = tuple(p._version for p in self._params[index])
        if self._slices is None or self._versions[index] != versions:
            self.prepare()
        assert self._slices is not None
        return self._slices[index].to(dtype)  # a no-op under autocast, where the bmm made them bf16


def task_matrix_batches(layers: Iterable[object]) -> list[TaskMatrixBatch]:
    """The MTL-LoRA layers among ``layers``, grouped by shape (a lone layer of its shape is left alone)."""
    groups: dict[tuple[object, ...], list[MTLLoRALinear]] = {}
    for layer in layers:
        if isinstance(layer, MTLLoRALinear) and not layer.is_merged:
            groups.setdefault(_shape_key(layer), []).append(layer)
    return [TaskMatrixBatch(group) for group in groups.values() if len(group) > 1]
