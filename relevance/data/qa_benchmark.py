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

Market policies (``policy``, issue 13): real ad markets differ in what they call relevant. With a
``foreign`` file (a parallel SQuAD file in another language, matched by question id, as XQuAD's are)
each question gets a fourth row, *foreign*: its own paragraph in the other language. Labels by policy:

=============  ====  ====  =======  ====
policy         pos   hard  foreign  easy
=============  ====  ====  =======  ====
strict         1     0     0        0
topical        1     1     0        0     (same topic, local language only)
exact-any      1     0     1        0     (the exact answer, in any language)
=============  ====  ====  =======  ====

``topical`` and ``exact-any`` cross: no single ranking of hard and foreign rows serves both, which is
where a per-market adapter has something to learn that a shared one cannot. A twin market (say
``de-any`` beside ``de``) is the same questions under the other policy: a simulation of market
policies on real text, not real ad judgments.

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
POLICIES: dict[str, dict[str, int]] = {
    "strict": {"pos": 1, "hard": 0, "foreign": 0, "easy": 0},
    "topical": {"pos": 1, "hard": 1, "foreign": 0, "easy": 0},
    "exact-any": {"pos": 1, "hard": 0, "foreign": 1, "easy": 0},
}
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


def _foreign_paragraphs(foreign: dict[str, Any], source: str) -> dict[str, Paragraph]:
    """Question id → its own paragraph in the foreign file."""
    out = {}
    for a, art in enumerate(_articles(foreign, source)):
        for p in art["paragraphs"]:
            title, text = split_context(str(p.get("context", "")), str(art["title"]))
            out.update({str(qa["id"]): Paragraph(a, title, text) for qa in p.get("qas", [])})
    return out


def build_rows(squad: dict[str, Any], market: str, seed: int = 0, source: str = "input",
               max_questions: int | None = None, policy: str = "strict",
               foreign: dict[str, Any] | None = None, foreign_source: str = "foreign") -> dict[str, list]:
    """Columns of raw contract rows (three per question, four with ``foreign``) for ``market``.

    ``max_questions`` keeps a seeded random subset of the questions (in file order); negatives are
    still drawn from every paragraph. On parallel files the same questions are kept in every language.
    ``policy`` labels the rows (module docstring); the foreign rows draw nothing from the seed, so the
    other rows are the same bytes with or without them.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: expected one of {sorted(POLICIES)}")
    if policy == "exact-any" and foreign is None:
        raise ValueError("policy 'exact-any' labels foreign-language rows relevant: give the parallel file "
                         "of another language (--foreign-squad)")
    labels = POLICIES[policy]
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
    far = _foreign_paragraphs(foreign, foreign_source) if foreign is not None else None
    if far is not None:
        missing = [qid for _, qid, _ in questions if qid not in far]
        if missing:
            raise ValueError(f"{foreign_source} lacks {len(missing)} of the {len(questions)} questions of {source} "
                             f"(e.g. id {missing[0]!r}): the foreign file must be a parallel translation")

    def add(kind: str, qid: str, query: str, article: int, p: Paragraph, label: int) -> None:
        # query_id is the *question's* article, so all three rows of a question share one split.
        for name, value in (("example_id", f"{market}-{qid}-{kind}"), ("market", market), ("query", query),
                            ("ad_title", p.title), ("ad_description", p.text),
                            ("query_id", str(articles[article]["title"])), ("label", label)):
            cols[name].append(value)

    n_articles = len(articles)
    for own, qid, query in questions:
        p = paras[own]
        add("pos", qid, query, p.article, p, labels["pos"])
        siblings = [i for i in by_article[p.article] if i != own]
        if siblings:  # an article with a single paragraph has no hard negative
            add("hard", qid, query, p.article, paras[siblings[rng.integers(len(siblings))]], labels["hard"])
        if far is not None:
            add("foreign", qid, query, p.article, far[qid], labels["foreign"])
        other = (p.article + 1 + int(rng.integers(n_articles - 1))) % n_articles
        add("easy", qid, query, p.article, paras[by_article[other][rng.integers(len(by_article[other]))]],
            labels["easy"])
    return cols


def _read_squad(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid UTF-8 JSON: {exc}") from exc


def write_qa_benchmark(squad_file: str | Path, market: str, out: str | Path, seed: int = 0,
                       overwrite: bool = False, max_questions: int | None = None, policy: str = "strict",
                       foreign_file: str | Path | None = None) -> dict[str, Any]:
    """Write ``out/market=<market>/part-0.parquet`` from ``squad_file``; returns row counts by kind.

    Other markets' partitions under ``out`` are left alone, so one raw dataset is built market by
    market. An existing partition of this market is replaced only with ``overwrite``.
    """
    squad_file = Path(squad_file)
    squad = _read_squad(squad_file)
    foreign = _read_squad(Path(foreign_file)) if foreign_file is not None else None
    cols = build_rows(squad, market, seed, source=str(squad_file), max_questions=max_questions, policy=policy,
                      foreign=foreign, foreign_source=str(foreign_file))
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
            "easy_negatives": kinds.count("easy"), "foreign": kinds.count("foreign"), "policy": policy,
            "positives": int(sum(cols["label"])), "articles": len(set(cols["query_id"]))}
