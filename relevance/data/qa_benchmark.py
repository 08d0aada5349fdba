"""Turn a SQuAD-format QA file into raw query–ad contract rows: a real multilingual relevance benchmark.

Why: no public query–ad judgments exist in several languages, but translated QA data does. A
question stands in for the query and a paragraph for the ad. Per question we emit three rows:

* positive       (label 1): the question and its own paragraph;
* hard negative  (label 0): another paragraph of the *same* article (same topic, wrong content);
* easy negative  (label 0): a paragraph of *another* article.

``ad_title`` is the article title (for JSQuAD contexts that read ``title [SEP] text``, the part
before ``[SEP]``), ``ad_description`` the paragraph text, and ``query_id`` the article title, so the
query-keyed split (:mod:`data_contracts.splits`) keeps every article in one split. XQuAD's titles are
identical in every language, so one article lands in the same split in every market.

Deterministic: the negatives come from ``numpy.random.default_rng(seed)`` walked in file order, so
the same file and seed give the same bytes. XQuAD files are parallel (same articles, paragraphs and
questions in the same order), so one seed picks the *same* negatives in every language.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.markets import validate_market

SEP = "[SEP]"
_SCHEMA = pa.schema([("example_id", pa.string()), ("market", pa.string()), ("query", pa.string()),
                     ("ad_title", pa.string()), ("ad_description", pa.string()), ("query_id", pa.string()),
                     ("label", pa.int64())])


@dataclass(frozen=True)
class Paragraph:
    """One paragraph: the article it belongs to (index and title) and its text without the title."""

    article: int
    title: str
    text: str


def split_context(context: str, title: str) -> tuple[str, str]:
    """``(ad_title, text)``: JSQuAD's ``title [SEP] text`` is split; otherwise the article title is used."""
    head, sep, rest = context.partition(SEP)
    if sep and head.strip() and rest.strip():
        return head.strip(), rest.strip()
    return title.replace("_", " ").strip(), context.strip()


def _articles(squad: dict[str, Any], source: str) -> list[dict[str, Any]]:
    data = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} is not SQuAD-format: expected a non-empty top-level 'data' list of "
                         "articles with 'title' and 'paragraphs'")
    for i, art in enumerate(data):
        if not isinstance(art, dict) or "title" not in art or not isinstance(art.get("paragraphs"), list):
            raise ValueError(f"{source}: article {i} lacks 'title' or a 'paragraphs' list")
    if len(data) < 2:
        raise ValueError(f"{source} has {len(data)} article; easy negatives need at least 2")
    return data


def build_rows(squad: dict[str, Any], market: str, seed: int = 0, source: str = "input",
               max_questions: int | None = None) -> dict[str, list]:
    """Columns of raw contract rows (three per question, see the module docstring) for ``market``.

    ``max_questions`` keeps a seeded random subset of the questions (in file order); negatives are
    still drawn from every paragraph. On parallel files the same questions are kept in every language.
    """
    if max_questions is not None and (isinstance(max_questions, bool) or not isinstance(max_questions, int)
                                      or max_questions < 1):
        raise ValueError(f"max_questions={max_questions!r} is invalid: expected a positive integer or None")
    market = validate_market(market)
    articles = _articles(squad, source)
    paras: list[Paragraph] = []
    by_article: list[list[int]] = []
    questions: list[tuple[int, str, str]] = []  # (paragraph index, question id, question text)
    for a, art in enumerate(articles):
        idx = []
        for p in art["paragraphs"]:
            title, text = split_context(str(p.get("context", "")), str(art["title"]))
            idx.append(len(paras))
            paras.append(Paragraph(a, title, text))
            for qa in p.get("qas", []):
                questions.append((idx[-1], str(qa["id"]), str(qa["question"]).strip()))
        by_article.append(idx)
    if not questions:
        raise ValueError(f"{source} holds no questions ('qas')")
    rng = np.random.default_rng(seed)
    if max_questions is not None and max_questions < len(questions):
        keep = np.sort(rng.choice(len(questions), size=max_questions, replace=False))
        questions = [questions[i] for i in keep]
    cols: dict[str, list] = {name: [] for name in _SCHEMA.names}

    def add(kind: str, qid: str, query: str, article: int, p: Paragraph, label: int) -> None:
        # query_id is the *question's* article, so all three rows of a question share one split.
        for name, value in (("example_id", f"{market}-{qid}-{kind}"), ("market", market), ("query", query),
                            ("ad_title", p.title), ("ad_description", p.text),
                            ("query_id", str(articles[article]["title"])), ("label", label)):
            cols[name].append(value)

    n_articles = len(articles)
    for own, qid, query in questions:
        p = paras[own]
        add("pos", qid, query, p.article, p, 1)
        siblings = [i for i in by_article[p.article] if i != own]
        if siblings:  # an article with a single paragraph has no hard negative
            add("hard", qid, query, p.article, paras[siblings[rng.integers(len(siblings))]], 0)
        other = (p.article + 1 + int(rng.integers(n_articles - 1))) % n_articles
        add("easy", qid, query, p.article, paras[by_article[other][rng.integers(len(by_article[other]))]], 0)
    return cols


def write_qa_benchmark(squad_file: str | Path, market: str, out: str | Path, seed: int = 0,
                       overwrite: bool = False, max_questions: int | None = None) -> dict[str, Any]:
    """Write ``out/market=<market>/part-0.parquet`` from ``squad_file``; returns row counts by kind.

    Other markets' partitions under ``out`` are left alone, so one raw dataset is built market by
    market. An existing partition of this market is replaced only with ``overwrite``.
    """
    squad_file = Path(squad_file)
    if not squad_file.is_file():
        raise FileNotFoundError(f"SQuAD file {squad_file} does not exist")
    try:
        squad = json.loads(squad_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{squad_file} is not valid UTF-8 JSON: {exc}") from exc
    cols = build_rows(squad, market, seed, source=str(squad_file), max_questions=max_questions)
    folder = Path(out) / f"market={validate_market(market)}"
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} already holds data: pass --overwrite to replace this market")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".part-0.parquet.tmp"
    pq.write_table(pa.table(cols, schema=_SCHEMA), tmp)
    tmp.rename(folder / "part-0.parquet")
    kinds = [e.rsplit("-", 1)[1] for e in cols["example_id"]]
    return {"market": market, "path": str(folder), "rows": len(kinds),
            "questions": kinds.count("pos"), "hard_negatives": kinds.count("hard"),
            "easy_negatives": kinds.count("easy"), "articles": len(set(cols["query_id"]))}
