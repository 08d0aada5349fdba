import pytest

from data_contracts.splits import assign_splits, derive_query_id, normalise_query, parse_fractions, split_of


def test_normalised_queries_share_an_id():
    assert normalise_query("  Nike   SHOES ") == "nike shoes"
    assert derive_query_id("Nike  Shoes") == derive_query_id("nike shoes")
    assert derive_query_id("nike shoes") != derive_query_id("nike shoe")


def test_split_is_a_pure_function_of_id_and_seed():
    # golden values: a change of hash would silently move queries between splits across versions
    assert derive_query_id("red bike") == "q-" + __import__("hashlib").blake2b(b"red bike", digest_size=8).hexdigest()
    ids = [f"q{i}" for i in range(5000)]
    a = assign_splits(ids, 0, (0.8, 0.1, 0.1))
    assert a == assign_splits(list(reversed(ids)), 0, (0.8, 0.1, 0.1))[::-1]
    assert a != assign_splits(ids, 1, (0.8, 0.1, 0.1))
    frac = {s: a.count(s) / len(a) for s in ("train", "valid", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["valid"] - 0.1) < 0.02


def test_split_edges():
    assert split_of("anything", 0, (1.0, 0.0, 0.0)) == "train"
    assert split_of("anything", 0, (0.0, 0.0, 1.0)) == "test"


@pytest.mark.parametrize("bad", ["0.8,0.1", "0.8,0.3,0.1", "a,b,c", "-0.1,0.6,0.5"])
def test_bad_fractions(bad):
    with pytest.raises(ValueError, match="split fractions"):
        parse_fractions(bad)


def test_columnar_ids_and_splits_match_the_row_rule():
    import hashlib

    import pyarrow as pa

    from data_contracts.splits import SPLITS, query_ids_and_splits

    def reference_split(query_id, seed, fractions):  # the formula as first released: splits must never move
        digest = hashlib.blake2b(query_id.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        return "train" if u < fractions[0] else ("valid" if u < fractions[0] + fractions[1] else "test")

    queries = [f"Query  {i % 7} Ünï" for i in range(300)]
    given = [None, "", " ", "\u3000", "qid-1", "qid-1 "] * 50
    for seed, fractions in ((0, (0.8, 0.1, 0.1)), (3, (0.2, 0.3, 0.5)), (1, (0.0, 1.0, 0.0))):
        ids, codes = query_ids_and_splits(pa.array(given, pa.string()), pa.array(queries), seed, fractions)
        expected = [q if q is not None and q.strip() else derive_query_id(t) for q, t in zip(given, queries)]
        assert ids.to_pylist() == expected
        assert [SPLITS[c] for c in codes] == [reference_split(q, seed, fractions) for q in expected]
        assert assign_splits(expected, seed, fractions) == [reference_split(q, seed, fractions) for q in expected]
