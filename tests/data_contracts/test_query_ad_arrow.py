"""The Arrow kernels of contract v1 against the pandera reference, batch by batch: same valid rows,
same quarantined rows with the same ``rule`` and ``detail``, whatever the column types."""

import sys

import pyarrow as pa
import pytest

from data_contracts import query_ad
from data_contracts.query_ad import ROW_CHECKS, RULES, validate
from data_contracts.query_ad_arrow import blank_regex, supports, validate_batch


class Seen:
    """``seen_ids`` for one call: an in-memory oracle of first occurrences."""

    def __init__(self):
        self.ids = set()

    def first_occurrence(self, ids):
        out = []
        for i in ids:
            out.append(i not in self.ids)
            self.ids.add(i)
        return out


def plain(rows):
    """Reference cells hold NaN where Arrow holds null; compare them as null."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]


def assert_same(table: pa.Table, **kwargs):
    seen_ref, seen_new = (Seen(), Seen()) if kwargs.pop("dedup", False) else (None, None)
    ref = validate(table.to_pandas(), seen_ids=seen_ref, **kwargs)
    new = validate_batch(table.combine_chunks().to_batches()[0], seen_ids=seen_new, **kwargs)
    assert plain(new.quarantined.to_pylist()) == plain(pa.Table.from_pandas(ref.quarantined, preserve_index=False).to_pylist())
    assert new.valid.to_pylist() == ref.valid.to_dict("records")
    return new


def batch(label, **overrides):
    cols = {
        "example_id": ["a", " ", None, "d", "e", "a", "g", "h"],
        "market": ["us", "US ", "us", None, "../etc", "us", "gb", "us\n"],
        "query": ["red bike", "  ", "q" * 2001, None, "\x1c\u3000", "Ünï\u00a0code", "ok", "q" * 2000],
        "ad_title": ["t", None, "\t", "t" * 2001, "t", "t", "t", "t"],
        "ad_description": [None, "d" * 10_001, "d" * 10_000, None, "", "x", "y", None],
        "query_id": [None, "", "x", " ", "q1", "q1", None, "\u2003"],
        "label": label,
    }
    return pa.table(cols | overrides)


LABELS = {
    "int": pa.array([0, 1, 2, -1, 0, 1, 1, 0], pa.int64()),
    "int_with_null": pa.array([0, 1, None, 2, 0, 1, 1, 0], pa.int64()),
    "uint8": pa.array([0, 1, 1, 0, 0, 1, 1, 0], pa.uint8()),
    "float": pa.array([0.0, -0.0, 2.5, float("nan"), None, 1.0, 1.0, float("inf")]),
    "null": pa.nulls(8),
    "string": pa.array(["1", "yes", None, "0", "no", "1", "0", ""]),
}


@pytest.mark.parametrize("label", list(LABELS))
@pytest.mark.parametrize("partition", [None, "us", "US "])
def test_every_rule_and_label_type_matches_the_reference(label, partition):
    t = batch(LABELS[label])
    assert_same(t, partition_market=partition, dedup=True)
    assert_same(t.drop_columns(["market"]), partition_market=partition)
    assert_same(t.drop_columns(["ad_title"]), missing=["ad_title"], partition_market=partition)


def test_multi_rule_rows_name_the_first_rule_and_list_all():
    new = assert_same(batch(LABELS["int"]), partition_market="us", dedup=True)
    rows = {r["example_id"]: r for r in new.quarantined.to_pylist()}
    assert rows[" "]["rule"] == "example_id_empty"
    assert rows[" "]["detail"].split("; ")[1:3] == ["market_invalid: market='US ' (3 chars)", "query_empty: query='  ' (2 chars)"]
    assert rows["g"]["rule"] == "market_partition_mismatch"
    assert {r["rule"] for r in new.quarantined.to_pylist()} <= set(RULES)


def test_scoring_contract_without_label_and_large_strings():
    t = batch(LABELS["int"]).drop_columns(["label"])
    large = t.cast(pa.schema([(f.name, pa.large_string()) for f in t.schema]))
    for table in (t, large):
        assert_same(table, require_label=False, dedup=True)


def test_types_the_kernels_do_not_cover_are_declined_by_name():
    t = batch(LABELS["int"], query=pa.array(range(8)))
    assert not supports(t.schema)
    assert supports(t.schema.remove(t.schema.get_field_index("label")), require_label=True) is False
    assert not supports(batch(pa.array([True] * 8)).schema)
    with pytest.raises(TypeError, match="query: int64"):
        validate_batch(t.to_batches()[0])


def test_blank_is_what_str_strip_empties():
    import pyarrow.compute as pc

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    samples = [c * 2 for c in spaces] + ["", "\u200b", "\ufeff", "x", "\x00", " a ", "\u3000\x1c\x85"]
    blank = pc.match_substring_regex(pa.array(samples), blank_regex()).to_pylist()
    assert blank == [s.strip() == "" for s in samples]


def test_one_table_defines_the_rules_of_both_backends():
    schema = query_ad.schema(require_label=True)
    by_column = {name: [c.name for c in col.checks] for name, col in schema.columns.items()}
    expected: dict = {}
    for check in ROW_CHECKS:
        expected.setdefault(check.column, []).append(check.rule)
    assert by_column == expected
    assert {c.rule for c in ROW_CHECKS} <= set(RULES)
