"""Synthetic multi-market search-ads data with planted, documented relevance signals.

Each row pairs a shopper's query ("apex wireless headphones under $80") with an ad (title
"Apex Headphones – Wireless", description "Wireless headphones by Apex. From $64. Free delivery.").
Every pair is drawn as one *ad type*, and the label follows from the ad type and the market:

=================  ====  ====  ====  ====  ====  =============================================
ad type             us    gb    de    fr    jp   what the ad is
=================  ====  ====  ====  ====  ====  =============================================
exact                1     1     1     1     1   the product asked for, brand/colour/budget met
other_product        0     0     0     0     0   a different product type
other_brand          1     0     1     1     0   same product, another brand than the query's
other_color          1     1     0     0     1   same product, another colour than the query's
over_budget          0     0     0     0     1   same product, priced above "under <price>"
accessory            0     0     1     0     0   an accessory of the product (laptop → sleeve)
refurbished          1     0     0     1     0   the product, refurbished
=================  ====  ====  ====  ====  ====  =============================================

(a) **Shared signal**: product match (``exact`` → 1, ``other_product`` → 0 everywhere).
(b) **Market-specific signals**: brand loyalty (gb, jp), colour strictness (de, fr), price
    tolerance (jp), deal seeking (us), visible through each market's currency ($ £ € ¥).
(c) **Planted conflict, de vs fr**: both markets use €, the same English text and the same mix of ad
    types, so nothing in (query, ad) tells them apart; yet ``accessory`` is relevant in de and not in
    fr, and ``refurbished`` the reverse. A model given no market information cannot fit both; these two
    types make up 40% of de and fr rows. Markets not in the table get a profile seeded by their code.

Labels flip with probability 3% (annotation noise). Market sizes are unequal: the i-th market gets
``rows_per_market × SIZE_WEIGHTS[i mod 5]`` rows. With ``corrupt_fraction`` > 0, bad rows of every
contract rule are mixed in, and ``_demo_manifest.json`` (ignored by ingest: leading underscore) lists
each planted bad row's ``example_id`` and the rule it must be quarantined under. Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.markets import parse_markets

AD_TYPES = ("exact", "other_product", "other_brand", "other_color", "over_budget", "accessory", "refurbished")
LABELS = {  # ad type → label, per market (the table above)
    "us": (1, 0, 1, 1, 0, 0, 1),
    "gb": (1, 0, 0, 1, 0, 0, 0),
    "de": (1, 0, 1, 0, 0, 1, 0),
    "fr": (1, 0, 1, 0, 0, 0, 1),
    "jp": (1, 0, 0, 1, 1, 0, 0),
}
MIX = (0.30, 0.20, 0.10, 0.10, 0.10, 0.10, 0.10)
CONFLICT_MIX = (0.20, 0.15, 0.075, 0.075, 0.10, 0.20, 0.20)  # de, fr: accessory + refurbished = 40%
CONFLICT_MARKETS = ("de", "fr")
CURRENCY = {"us": ("$", 1.0), "gb": ("£", 0.8), "de": ("€", 0.9), "fr": ("€", 0.9), "jp": ("¥", 150.0)}
SIZE_WEIGHTS = (1.0, 0.55, 0.8, 0.8, 0.35)
LABEL_NOISE = 0.03

PRODUCTS = {  # product → (accessory, base price in USD)
    "laptop": ("laptop sleeve", 900), "phone": ("phone case", 600), "camera": ("camera bag", 500),
    "headphones": ("headphone stand", 120), "coffee maker": ("coffee filters", 80),
    "running shoes": ("shoe laces", 110), "tent": ("tent stakes", 200), "bike": ("bike lock", 450),
    "watch": ("watch strap", 250), "tv": ("tv wall mount", 700), "backpack": ("rain cover", 70),
    "blender": ("blender jar", 90), "desk chair": ("chair mat", 180), "monitor": ("monitor arm", 300),
}
BRANDS = ("Apex", "Nordic", "Zenith", "Lumo", "Kora", "Vexa", "Orion", "Haku", "Brava", "Solis")
COLORS = ("black", "white", "red", "blue", "green", "silver", "grey")
FEATURES = ("wireless", "lightweight", "waterproof", "compact", "premium", "eco")
BAD_KINDS = (  # planted kind → the rule ingest must quarantine it under
    ("query_null", "query_empty"), ("query_blank", "query_empty"), ("title_null", "ad_title_empty"),
    ("title_blank", "ad_title_empty"), ("label_2", "label_not_binary"), ("label_minus_1", "label_not_binary"),
    ("label_nan", "label_not_binary"), ("market_dotdot", "market_invalid"), ("market_upper_padded", "market_invalid"),
    ("market_empty", "market_invalid"), ("market_short", "market_invalid"),
    ("market_other_partition", "market_partition_mismatch"), ("duplicate_id", "duplicate_example_id"),
    ("query_too_long", "query_too_long"), ("title_too_long", "ad_title_too_long"),
    ("description_too_long", "ad_description_too_long"), ("example_id_blank", "example_id_empty"),
)


def market_labels(market: str) -> tuple[int, ...]:
    """The ad type → label profile of a market (seeded by its code when not in :data:`LABELS`)."""
    if market in LABELS:
        return LABELS[market]
    rng = np.random.default_rng(int(hashlib.sha256(market.encode()).hexdigest()[:8], 16))
    return (1, 0, *(int(x) for x in rng.integers(0, 2, size=5)))


def _pair(rng: np.random.Generator, ad_type: str, cur: tuple[str, float]) -> tuple[str, str, str]:
    """One (query, ad_title, ad_description) for an ad type."""
    names = list(PRODUCTS)
    product = names[rng.integers(len(names))]
    accessory, base = PRODUCTS[product]
    brand, color, feature = BRANDS[rng.integers(len(BRANDS))], COLORS[rng.integers(len(COLORS))], FEATURES[rng.integers(len(FEATURES))]
    price = base * float(rng.lognormal(0.0, 0.25))
    budget = price * float(rng.uniform(1.05, 1.4))
    with_brand = ad_type == "other_brand" or rng.random() < 0.5
    with_color = ad_type == "other_color" or rng.random() < 0.4
    with_budget = ad_type == "over_budget" or rng.random() < 0.3
    words = ([brand.lower()] if with_brand else []) + ([color] if with_color else []) + [product]
    query = " ".join(words) + (f" under {_money(budget, cur)}" if with_budget else "")
    ad_brand, ad_color, ad_product, prefix = brand, color, product, ""
    if ad_type == "other_product":
        ad_product = names[(names.index(product) + 1 + rng.integers(len(names) - 1)) % len(names)]
    elif ad_type == "other_brand":
        ad_brand = BRANDS[(BRANDS.index(brand) + 1 + rng.integers(len(BRANDS) - 1)) % len(BRANDS)]
    elif ad_type == "other_color":
        ad_color = COLORS[(COLORS.index(color) + 1 + rng.integers(len(COLORS) - 1)) % len(COLORS)]
    elif ad_type == "over_budget":
        price = budget * float(rng.uniform(1.3, 2.0))
    elif ad_type == "accessory":
        ad_product, price = accessory, base * 0.06 * float(rng.lognormal(0.0, 0.3))
    elif ad_type == "refurbished":
        prefix, price = "Refurbished ", price * 0.7
    title = f"{prefix}{ad_brand} {ad_product.title()} – {ad_color.title()}, {feature.title()}"
    description = f"{feature.capitalize()} {ad_color} {ad_product} by {ad_brand}. From {_money(price, cur)}. Free delivery."
    return query, title, description


def _money(usd: float, cur: tuple[str, float]) -> str:
    value = usd * cur[1]
    return f"{cur[0]}{value:,.0f}" if value >= 100 else f"{cur[0]}{value:.2f}"


def generate_market(market: str, n_rows: int, rng: np.random.Generator) -> dict[str, list]:
    """Valid rows of one market as columns (example_id, market, query, ad_title, ad_description, label)."""
    mix = CONFLICT_MIX if market in CONFLICT_MARKETS else MIX
    types = rng.choice(len(AD_TYPES), size=n_rows, p=np.asarray(mix) / sum(mix))
    flips = rng.random(n_rows) < LABEL_NOISE
    profile = market_labels(market)
    cur = CURRENCY.get(market, ("$", 1.0))
    cols: dict[str, list] = {k: [] for k in ("example_id", "market", "query", "ad_title", "ad_description", "label")}
    for i, (t, flip) in enumerate(zip(types, flips)):
        q, title, desc = _pair(rng, AD_TYPES[t], cur)
        cols["example_id"].append(f"{market}-{i:08d}")
        cols["market"].append(market)
        cols["query"].append(q)
        cols["ad_title"].append(title)
        cols["ad_description"].append(desc)
        cols["label"].append(int(profile[t]) ^ int(flip))
    return cols


def _corrupt(cols: dict[str, list], market: str, other: str, n_bad: int, rng: np.random.Generator) -> dict[str, list]:
    """Overwrite ``n_bad`` rows (cycling through every kind) with bad values; returns {kind: [ids]}."""
    n = len(cols["example_id"])
    positions = np.sort(rng.choice(np.arange(n // 2, n), size=min(n_bad, n - n // 2), replace=False))
    planted: dict[str, list] = {}
    for j, pos in enumerate(positions):
        kind, _rule = BAD_KINDS[j % len(BAD_KINDS)]
        eid = f"{market}-bad-{j:06d}"
        cols["example_id"][pos] = eid
        long_text = "x" * 10_001
        edits = {
            "query_null": ("query", None), "query_blank": ("query", "   "), "title_null": ("ad_title", None),
            "title_blank": ("ad_title", "\t "), "label_2": ("label", 2), "label_minus_1": ("label", -1),
            "label_nan": ("label", None), "market_dotdot": ("market", "../etc"), "market_upper_padded": ("market", market.upper() + " "),
            "market_empty": ("market", ""), "market_short": ("market", "x"), "market_other_partition": ("market", other),
            "query_too_long": ("query", long_text[:2_001]), "title_too_long": ("ad_title", long_text[:2_001]),
            "description_too_long": ("ad_description", long_text), "example_id_blank": ("example_id", " "),
        }
        if kind == "duplicate_id":
            eid = cols["example_id"][int(rng.integers(0, n // 2))]  # an earlier, valid row's id
            cols["example_id"][pos] = eid
        else:
            col, value = edits[kind]
            cols[col][pos] = value
        planted.setdefault(kind, []).append(eid if kind != "example_id_blank" else None)
    return planted


def write_demo_data(out: str | Path, markets: str | list[str] = "us,gb,de,fr,jp", rows_per_market: int = 2_000,
                    seed: int = 0, corrupt_fraction: float = 0.0, overwrite: bool = False) -> dict:
    """Write raw Parquet under ``out/market=xx/`` (plus ``_demo_manifest.json``); returns the manifest."""
    codes = parse_markets(markets)
    if rows_per_market < 1:
        raise ValueError(f"rows_per_market must be ≥ 1, got {rows_per_market}")
    if not 0.0 <= corrupt_fraction < 0.5:
        raise ValueError(f"corrupt_fraction must be in [0, 0.5), got {corrupt_fraction}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty: choose an empty directory or pass --overwrite")
        shutil.rmtree(out)
    manifest: dict = {"seed": seed, "corrupt_fraction": corrupt_fraction, "markets": {}}
    for i, market in enumerate(codes):
        rng = np.random.default_rng([seed, i])
        n = max(1, round(rows_per_market * SIZE_WEIGHTS[i % len(SIZE_WEIGHTS)]))
        cols = generate_market(market, n, rng)
        other = next((m for m in codes if m != market), "zz")
        n_bad = round(corrupt_fraction * n)
        planted = _corrupt(cols, market, other, n_bad, rng) if n_bad else {}
        folder = out / f"market={market}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table(cols, schema=_RAW_SCHEMA), folder / "part-0.parquet", row_group_size=50_000)
        if n_bad:
            planted.update(_side_files(folder, market, max(1, n_bad // 20)))
        manifest["markets"][market] = {"rows": n + sum(len(v) for k, v in planted.items() if k in _SIDE_KINDS), "planted": planted}
    manifest["rules"] = dict(BAD_KINDS) | {"label_string": "wrong_type", "missing_ad_title_column": "missing_column"}
    (out / "_demo_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


_RAW_SCHEMA = pa.schema([("example_id", pa.string()), ("market", pa.string()), ("query", pa.string()),
                         ("ad_title", pa.string()), ("ad_description", pa.string()), ("label", pa.int64())])
_SIDE_KINDS = ("label_string", "missing_ad_title_column")


def _side_files(folder: Path, market: str, k: int) -> dict[str, list]:
    """Whole-file faults: a label column of strings ('yes'/'no') and a file without ``ad_title``."""
    ids = [f"{market}-type-{j:04d}" for j in range(k)]
    base = {"example_id": ids, "market": [market] * k, "query": ["red bike"] * k,
            "ad_title": ["Apex Bike – Red"] * k, "ad_description": [None] * k}
    pq.write_table(pa.table(base | {"label": ["yes", "no"] * (k // 2) + ["yes"] * (k % 2)}), folder / "part-1-types.parquet")
    ids2 = [f"{market}-nocol-{j:04d}" for j in range(k)]
    nocol = {"example_id": ids2, "market": [market] * k, "query": ["tent"] * k, "label": [1] * k}
    pq.write_table(pa.table(nocol), folder / "part-2-missing-column.parquet")
    return {"label_string": ids, "missing_ad_title_column": ids2}
