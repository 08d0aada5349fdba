"""Market codes and the market → task-index map.

A *market* (``us``, ``de``, ``pt-br``…) is both a partition key of the data and a *task* of the
multi-task model. Codes are validated here, once, before they are ever used to build a path
(``market=../etc`` must never reach the filesystem). The task map is the sorted list of codes; it
travels with every model so that task index ``i`` means the same market at training and scoring time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MARKET_PATTERN = r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$"
_MARKET_RE = re.compile(MARKET_PATTERN)


def is_valid_market(code: object) -> bool:
    """True when ``code`` is a string matching :data:`MARKET_PATTERN` (lower-case, no padding)."""
    return isinstance(code, str) and _MARKET_RE.fullmatch(code) is not None


def validate_market(code: object) -> str:
    """Return ``code`` unchanged if it is a valid market code, else raise ``ValueError`` naming it."""
    if not is_valid_market(code):
        raise ValueError(
            f"invalid market code {code!r}: expected a lower-case code matching {MARKET_PATTERN} "
            "(e.g. 'us', 'de', 'jp', 'pt-br')"
        )
    return code  # type: ignore[return-value]


def parse_markets(text: str | Iterable[str]) -> list[str]:
    """Parse ``"us,gb,de"`` (or an iterable of codes) into a validated, de-duplicated list in order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        code = item.strip() if isinstance(item, str) else item
        if code == "":
            continue
        validate_market(code)
        if code not in out:
            out.append(code)
    if not out:
        raise ValueError(f"no market codes given in {text!r}")
    return out


def task_map(markets: Iterable[str]) -> dict[str, int]:
    """The market → task-index map: codes sorted, indices 0..T-1. Validates every code."""
    codes = sorted({validate_market(m) for m in markets})
    if not codes:
        raise ValueError("a task map needs at least one market")
    return {code: i for i, code in enumerate(codes)}


def task_index(mapping: Mapping[str, int], market: str) -> int:
    """Index of ``market`` in ``mapping``; an unknown market is an error naming the known ones."""
    try:
        return mapping[market]
    except KeyError:
        raise KeyError(
            f"unknown market {market!r}: this model knows {sorted(mapping)}"
        ) from None
