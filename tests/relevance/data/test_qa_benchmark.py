"""QA-to-relevance builder: three rows per question, article-keyed splits, determinism, clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from relevance.data.ingest import ingest
from relevance.data.qa_benchmark import POLICIES, build_rows, split_context, write_qa_benchmark

EXE = Path(sys.executable).with_name("ads-relevance")


def squad(lang: str = "en", n_articles: int = 5, jsquad: bool = False) -> dict:
    """A parallel SQuAD-format file: article a has a+1 paragraphs (article 0: one, so no hard negative)."""
    data = []
    for a in range(n_articles):
        title = f"Article_{a}"
        paragraphs = []
        for p in range(a + 1):
            text = f"{lang} text of article {a} paragraph {p}."
            paragraphs.append({"context": f"Title {a} [SEP] {text}" if jsquad else text,
                               "qas": [{"id": f"q{a}-{p}-{k}", "question": f"{lang} question {a}.{p}.{k}?",
                                        "answers": []} for k in range(2)]})
        data.append({"title": title, "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def frame(cols: dict) -> pd.DataFrame:
    df = pd.DataFrame(cols)
    df["kind"] = df["example_id"].str.rsplit("-", n=1).str[1]
    df["qid"] = df["example_id"].str.split("-", n=1).str[1].str.rsplit("-", n=1).str[0]
    return df


def test_three_rows_per_question_with_the_right_paragraphs():
    df = frame(build_rows(squad(), "en", seed=3))
    questions = sum(2 * (a + 1) for a in range(5))
    assert (df["kind"] == "pos").sum() == questions
    assert (df["kind"] == "easy").sum() == questions
    assert (df["kind"] == "hard").sum() == questions - 2  # article 0 has one paragraph: no hard negative
    assert df["example_id"].is_unique and set(df["market"]) == {"en"}
    assert dict(df.groupby("kind")["label"].unique().map(list)) == {"pos": [1], "hard": [0], "easy": [0]}
    for _, row in df.iterrows():
        a, p, _ = row["qid"][1:].split("-")
        own = f"en text of article {a} paragraph {p}."
        ad_article = row["ad_description"].split()[4]
        assert row["query_id"] == f"Article_{a}"  # the question's article, on all three rows
        if row["kind"] == "pos":
            assert row["ad_description"] == own
        elif row["kind"] == "hard":
            assert ad_article == a and row["ad_description"] != own
        else:
            assert ad_article != a
        assert row["ad_title"] == f"Article {ad_article}"


def test_jsquad_contexts_give_title_and_text():
    assert split_context("梅雨 [SEP] 梅雨（つゆ）は…", "梅雨") == ("梅雨", "梅雨（つゆ）は…")
    assert split_context("plain text", "Super_Bowl_50") == ("Super Bowl 50", "plain text")
    df = frame(build_rows(squad(jsquad=True), "jp"))
    assert df["ad_title"].str.startswith("Title ").all()
    assert not df["ad_description"].str.contains(r"\[SEP\]").any()


def test_deterministic_for_a_seed_and_parallel_across_languages():
    a, b = build_rows(squad(), "en", seed=7), build_rows(squad(), "en", seed=7)
    assert a == b
    assert build_rows(squad(), "en", seed=8) != a
    en = frame(build_rows(squad("en"), "en", seed=7, max_questions=9))
    de = frame(build_rows(squad("de"), "de", seed=7, max_questions=9))
    assert (en["kind"] == "pos").sum() == 9
    # parallel files: the same questions kept and the same negatives picked in every language
    assert list(en["qid"]) == list(de["qid"])
    assert list(en["ad_description"].str.replace("en ", "")) == list(de["ad_description"].str.replace("de ", ""))


def test_articles_land_in_one_split_in_every_market(tmp_path):
    raw = tmp_path / "raw"
    for lang in ("en", "de"):
        src = tmp_path / f"{lang}.json"
        src.write_text(json.dumps(squad(lang, n_articles=12)))
        info = write_qa_benchmark(src, lang, raw, seed=1)
        assert info["rows"] == info["questions"] + info["hard_negatives"] + info["easy_negatives"]
    summary = ingest(str(raw), tmp_path / "ds", (0.5, 0.25, 0.25), progress=False)
    assert all(not m["quarantined"] for m in summary["markets"].values())  # every row meets the contract
    curated = pd.read_parquet(tmp_path / "ds" / "curated")
    per_article = curated.groupby("query_id")["split"].nunique()
    assert (per_article == 1).all()  # all rows of an article (both languages) share one split
    assert curated["split"].nunique() >= 2  # the check above is not vacuous


def test_partition_is_not_replaced_without_overwrite(tmp_path):
    src = tmp_path / "en.json"
    src.write_text(json.dumps(squad()))
    write_qa_benchmark(src, "en", tmp_path / "raw")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_qa_benchmark(src, "en", tmp_path / "raw")
    assert write_qa_benchmark(src, "en", tmp_path / "raw", overwrite=True, max_questions=4)["questions"] == 4
    assert len(list((tmp_path / "raw" / "market=en").iterdir())) == 1


@pytest.mark.parametrize("data, market, kwargs, message", [
    ({"data": []}, "en", {}, "not SQuAD-format"),
    ({"rows": [1]}, "en", {}, "not SQuAD-format"),
    ({"data": [{"title": "A", "paragraphs": []}]}, "en", {}, "at least 2"),
    ({"data": [{"paragraphs": []}, {"title": "B", "paragraphs": []}]}, "en", {}, "article 0 lacks 'title'"),
    (squad(), "../etc", {}, "invalid market code '../etc'"),
    (squad(), "en", {"max_questions": 0}, "max_questions=0"),
])
def test_bad_input_is_refused_with_the_reason(data, market, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_rows(data, market, **kwargs)


def test_policies_label_the_four_kinds_and_twins_cross():
    """topical and exact-any disagree on the order of same-article and foreign rows: the policies cross."""
    base = frame(build_rows(squad("de"), "de", seed=3))
    rows = {policy: frame(build_rows(squad("de"), "de", seed=3, policy=policy, foreign=squad("en")))
            for policy in ("strict", "topical", "exact-any")}
    for policy, df in rows.items():
        assert dict(df.groupby("kind")["label"].unique().map(list)) == {
            k: [v] for k, v in POLICIES[policy].items()}, policy
        same = df[df["kind"] != "foreign"].drop(columns="label").reset_index(drop=True)
        pd.testing.assert_frame_equal(same, base.drop(columns="label"))  # foreign rows draw nothing from the seed
    foreign = rows["exact-any"].query("kind == 'foreign'")
    assert len(foreign) == (base["kind"] == "pos").sum()
    for _, row in foreign.iterrows():  # the question's own paragraph, in the other language
        a, p, _ = row["qid"][1:].split("-")
        assert row["ad_description"] == f"en text of article {a} paragraph {p}." and row["query"].startswith("de ")
    topical, exact = rows["topical"].set_index("kind")["label"], rows["exact-any"].set_index("kind")["label"]
    assert topical["hard"].min() > topical["foreign"].max() and exact["foreign"].min() > exact["hard"].max()
    assert frame(build_rows(squad("de"), "de", seed=3, policy="topical"))["label"].sum() == (
        (base["kind"] == "pos").sum() + (base["kind"] == "hard").sum())  # topical works without a foreign file


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "broad"}, "policy='broad' is invalid"),
    ({"policy": "exact-any"}, "give the parallel file"),
    ({"foreign": squad("en", n_articles=4)}, "lacks 10 of the 30 questions"),
])
def test_bad_policy_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_rows(squad("de"), "de", **kwargs)


def test_console_script(tmp_path):
    src = tmp_path / "en.json"
    src.write_text(json.dumps(squad()))
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(EXE), "build-qa-benchmark", "--squad", str(src), "--market", "en",
                          "--out", str(tmp_path / "raw")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert ("en: 88 rows from 30 questions in 5 articles (28 same-article, 30 other-article, 0 foreign-language "
            "rows; policy strict: 30 relevant)") in out.stdout
    (tmp_path / "de.json").write_text(json.dumps(squad("de")))
    twin = subprocess.run([str(EXE), "build-qa-benchmark", "--squad", str(src), "--market", "en-any", "--out",
                           str(tmp_path / "raw"), "--policy", "exact-any", "--foreign-squad", str(tmp_path / "de.json")],
                          capture_output=True, text=True, env=env)
    assert twin.returncode == 0 and "30 foreign-language rows; policy exact-any: 60 relevant" in twin.stdout, twin.stderr
    bad = subprocess.run([str(EXE), "build-qa-benchmark", "--squad", str(tmp_path / "missing.json"), "--market",
                          "en", "--out", str(tmp_path / "raw")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "missing.json does not exist" in bad.stderr
    (tmp_path / "bad.json").write_text("{not json")
    bad = subprocess.run([str(EXE), "build-qa-benchmark", "--squad", str(tmp_path / "bad.json"), "--market",
                          "en", "--out", str(tmp_path / "raw2")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not valid UTF-8 JSON" in bad.stderr
