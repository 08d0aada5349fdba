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
