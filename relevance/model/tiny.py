"""A tiny random transformers cross-encoder with a real fast tokenizer, built in code (no download).

Why: every test of the training side (and quick benchmarks and pipeline tests) needs *a* model that
``AutoModelForSequenceClassification`` / ``AutoTokenizer`` load from a local directory exactly like a
real one, yet trains in seconds on 2 CPU cores. The vocabulary covers the demo data's words (products,
brands, colours, features, connective words), market codes, digits, punctuation and currency
symbols, plus single letters and ``##`` continuations so any text tokenizes without ``[UNK]``.

The model is random: it knows nothing, so what a test measures is what training taught it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = """
laptop sleeve phone case camera bag headphones headphone stand coffee maker filters running shoes
shoe laces tent stakes bike lock watch strap tv wall mount backpack rain cover blender jar desk
chair mat monitor arm apex nordic zenith lumo kora vexa orion haku brava solis black white red blue
green silver grey wireless lightweight waterproof compact premium eco refurbished under from free
delivery by for with and the a of in to new cheap best sale buy us gb de fr jp
"""
_PUNCT = tuple(".,;:!?'\"()[]{}-–—/&%+*#@=<>_|")
_CURRENCY = ("$", "£", "€", "¥")
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_DIGITS = tuple("0123456789")
_SUPPORTED = ("bert",)


def vocabulary() -> list[str]:
    """The WordPiece vocabulary, in a fixed order (special tokens first: [PAD] is id 0)."""
    out: list[str] = []
    for token in (
        *SPECIAL_TOKENS, *_PUNCT, *_CURRENCY, *_DIGITS, *_LETTERS,
        *(f"##{c}" for c in _DIGITS + _LETTERS), *_WORDS.split(),
    ):
        if token not in out:
            out.append(token)
    return out


def build_tiny_tokenizer(out_dir: str | Path):
    """A lower-casing ``BertTokenizerFast`` over :func:`vocabulary`, saved to ``out_dir``."""
    from transformers import BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        kwargs: dict = {"vocab": {token: i for i, token in enumerate(vocab)}}
    else:  # transformers 4.x reads the file
        kwargs = {"vocab_file": str(vocab_file)}
    tokenizer = BertTokenizerFast(**kwargs, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(out)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    model_type: str = "bert",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    initializer_range: float = 0.1,
    dropout: float = 0.0,
) -> Path:
    """Write a random ``BertForSequenceClassification`` (num_labels=1) and its tokenizer to ``out_dir``.

    Same ``seed``, same weights. Saved with ``save_pretrained`` (safetensors), so it loads offline
    with ``AutoModelForSequenceClassification.from_pretrained(out_dir)``.

    Why ``initializer_range=0.1`` (BERT uses 0.02) and no dropout: in a *random* encoder with
    0.02 weights, attention and feed-forward outputs are ~1% of the residual stream, so [CLS] ends
    up as little more than its own embedding and adapters barely learn in a few hundred steps;
    at 0.1 the other tokens reach [CLS] and a rank-8 adapter learns the demo data's signals quickly.
    Dropout in the frozen base only adds noise to such short runs.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if model_type not in _SUPPORTED:
        raise ValueError(f"model_type={model_type!r} is not supported: expected one of {list(_SUPPORTED)}")
    if not 0 < initializer_range < 1 or not 0 <= dropout < 1:
        raise ValueError(f"initializer_range={initializer_range!r} must be in (0, 1) and dropout={dropout!r} in [0, 1)")
    for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}: choose e.g. hidden={heads * 16}")
    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(out)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    return out
