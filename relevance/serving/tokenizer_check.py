"""Whether a model's tokenizer may be loaded as a plain ``PreTrainedTokenizerFast``, checked at registration.

Why: loading multilingual-e5's tokenizer through ``AutoTokenizer`` takes 1.7 s of a scoring job's start on
a 2-core CPU, through ``PreTrainedTokenizerFast`` 0.6 s (``pyfunc_model.load_tokenizer``). The two agree
only when the saved ``tokenizer.json`` *is* the backend that the named class builds, and nothing in the
class changes how text is encoded. That holds for directories written by ``save_pretrained`` and not, for
example, for e5's original files (whitespace-only text and special-token strings encode differently), so
it is checked per version, never assumed; a version without the check (registered before it) loads
through ``AutoTokenizer``.

The check: the class overrides no method but ``__init__``; both backends serialise to the same JSON; the
special tokens, input names and padding/truncation sides agree; and the scoring encoding
(``pyfunc_model.encode``) gives the same ids on the market's valid rows and on :data:`PROBES`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pandas as pd

# Text where tokenizer classes are known to differ: empty and whitespace-only text, special-token strings,
# control and zero-width characters, compatibility characters (normalisation), long text (truncation).
PROBES = ("", " ", "   \t\n", "<s> </s> <pad> <mask> <unk> [CLS] [SEP] [PAD] [MASK] [UNK]",
          "\u200b\u00a0x\u3000y", "ﬁ ligature Ⅻ Å Å", "Ünïcödé  ß 日本語のテキスト 한국어 العربية हिन्दी",
          "emoji 😀 test", "UPPER lower MiXeD", "word " * 100)
ATTRIBUTES = ("all_special_tokens", "all_special_ids", "model_input_names", "padding_side", "truncation_side",
              "pad_token_id")


def _method_overrides(cls: type) -> list[str]:
    """Methods (other than ``__init__``) that ``cls`` defines itself, i.e. behaviour a plain fast tokenizer lacks."""
    methods = (classmethod, staticmethod, property)
    return sorted(name for name, value in vars(cls).items()
                  if name != "__init__" and (inspect.isfunction(value) or isinstance(value, methods)))


def _backend_spec(tokenizer: Any) -> dict[str, Any]:
    """The Rust backend's serialisation, less its truncation and padding: state that every transformers call
    sets afresh (a tokenizer that has encoded with truncation serialises it until the next call resets it)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return {key: value for key, value in spec.items() if key not in ("truncation", "padding")}


def compare_tokenizers(named: Any, generic: Any, queries: list[str], ads: list[str], max_length: int) -> str | None:
    """Why ``generic`` would not encode as ``named`` does, or None when they agree on everything checked."""
    from relevance.serving.pyfunc_model import encode

    overrides = _method_overrides(type(named))
    if overrides:
        return f"{type(named).__name__} overrides {overrides[:5]}"
    if _backend_spec(named) != _backend_spec(generic):
        return f"the saved tokenizer.json is not the backend that {type(named).__name__} builds"
    for attribute in ATTRIBUTES:
        if getattr(named, attribute, None) != getattr(generic, attribute, None):
            return f"{attribute} differs: {getattr(named, attribute, None)!r} vs {getattr(generic, attribute, None)!r}"
    probes = list(PROBES)
    queries, ads = list(queries) + probes + probes[::-1], list(ads) + probes + probes
    a, b = encode(named, queries, ads, max_length), encode(generic, queries, ads, max_length)
    if a != b:
        keys = sorted(set(a) | set(b))
        row = next((i for k in keys for i, (x, y) in enumerate(zip(a.get(k, []), b.get(k, []))) if x != y), None)
        where = f"row {row} ({queries[row][:40]!r}, {ads[row][:40]!r})" if row is not None else f"keys {keys}"
        return f"the encodings differ at {where}"
    return None


def check_generic_tokenizer(model_dir: str | Path, named: Any, rows: pd.DataFrame | None, market: str | None,
                            market_token: bool, max_length: int) -> dict[str, Any]:
    """``{"ok", "reason", "n", "arguments"}``: may ``model_dir``'s tokenizer (``named``, as ``AutoTokenizer``
    loaded it) be loaded as a plain fast tokenizer, with ``arguments`` (``pyfunc_model.load_tokenizer``)?
    ``rows``: the market's valid rows (query, ad_title[, ad_description]); ``n``: the pairs compared."""
    from relevance.serving.pyfunc_model import load_tokenizer, pair_texts

    if not (Path(model_dir) / "tokenizer.json").is_file():
        return {"ok": False, "reason": "no tokenizer.json", "n": 0, "arguments": None}
    queries, ads = pair_texts(rows, market, market_token) if rows is not None and len(rows) else ([], [])
    arguments = {"model_input_names": list(named.model_input_names)}  # the class's; the plain default may differ
    try:
        generic = load_tokenizer(model_dir, arguments)
    except Exception as exc:  # noqa: BLE001  any failure to load means: keep AutoTokenizer
        return {"ok": False, "reason": f"PreTrainedTokenizerFast cannot load it: {exc}"[:250], "n": 0,
                "arguments": None}
    reason = compare_tokenizers(named, generic, queries, ads, max_length)
    return {"ok": reason is None, "reason": reason, "n": len(queries) + 2 * len(PROBES),
            "arguments": arguments if reason is None else None}


def tokenizer_tags(check: dict[str, Any]) -> dict[str, str]:
    """Version tags of a check: ``generic_tokenizer`` true/false, and the reason when false."""
    tags = {"generic_tokenizer": str(bool(check.get("ok"))).lower()}
    if check.get("reason"):
        tags["generic_tokenizer_reason"] = str(check["reason"])[:250]
    return tags
