"""Module-tree helpers and per-market head copies.

A head copy lets a market added after training get its own classification head (and pooler, if
that is trained) without touching the head every other market uses: rows of the batch whose task
has a copy take the copy's output, all other rows take the shared head's output unchanged, so the
existing markets stay bit-identical (``train_new_markets_only(..., head=True)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn


def name_matches(name: str, pattern: str) -> bool:
    """True when module ``name`` is ``pattern`` or ends with ``.pattern`` (dotted-suffix match)."""
    return name == pattern or name.endswith("." + pattern)


def find_modules(model: nn.Module, patterns: Iterable[str]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module whose name matches one of ``patterns``, outermost only."""
    patterns = tuple(patterns)
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if name and any(name_matches(name, p) for p in patterns):
            taken.append(name)
            yield name, module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the sub-module at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class MarketHeads(nn.Module):
    """A head module shared by all markets plus per-market copies, routed per example (dim 0).

    ``shared`` keeps the original module (and its state-dict names under ``shared.``); ``copies``
    maps market code → copy. ``copy_tasks`` maps the same codes to task indices.
    """

    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.shared = shared
        self.copies = nn.ModuleDict()
        self.copy_tasks: dict[str, int] = {}
        self._task_ids: Tensor | None = None
        self.merged_task: int | None = None
        self.train(shared.training)

    def add_copy(self, market: str, task: int) -> nn.Module:
        """Copy the shared head for ``market`` (starting from its current weights) and return it."""
        if market not in self.copies:
            self.copies[market] = copy.deepcopy(self.shared)
            self.copy_tasks[market] = task
        return self.copies[market]

    def module_for(self, task: int) -> nn.Module:
        """The module serving ``task``: its copy if it has one, else the shared head."""
        for market, t in self.copy_tasks.items():
            if t == task:
                return self.copies[market]
        return self.shared

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        ids = self._task_ids
        if ids is None and self.merged_task is not None:
            return self.module_for(self.merged_task)(*args, **kwargs)
        out = self.shared(*args, **kwargs)
        if not self.copies:
            return out
        if ids is None:
            raise ValueError(
                f"this head has per-market copies for {sorted(self.copies)}: run the forward inside "
                "`with use_tasks(model, task_ids):` so each row gets its market's head"
            )
        ids = ids.to(out.device)
        for market, task in self.copy_tasks.items():
            mask = ids == task
            if bool(mask.any()):
                alt = self.copies[market](*args, **kwargs)
                out = torch.where(mask.view(-1, *([1] * (out.dim() - 1))), alt, out)
        return out
