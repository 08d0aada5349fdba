"""SeenIds against a plain Python set: first occurrences across and within batches, any text."""

import random

from relevance.data.dedup import SeenIds


def reference(batches):
    seen, out = set(), []
    for ids in batches:
        flags = []
        for i in ids:
            flags.append(i not in seen)
            seen.add(i)
        out.append(flags)
    return out


def test_first_occurrences_match_a_set_over_unsorted_repeating_unicode_ids(tmp_path):
    rng = random.Random(7)
    pool = [f"id-{rng.randrange(10**6)}" for _ in range(300)] + ["Ä-ß", "日本-1", "🚲-x", "é", "e\u0301", "z", "a b"]
    batches = [[rng.choice(pool) for _ in range(rng.randrange(0, 120))] for _ in range(12)]
    batches.append(["with\x00nul", "with\x00nul", pool[0]])  # the row-by-row path (NUL in JSON text)
    batches.append(["with\x00nul", pool[-1], "new"])
    seen = SeenIds(tmp_path / "seen.sqlite")
    try:
        got = [list(seen.first_occurrence(b)) for b in batches]
    finally:
        seen.close()
    assert got == reference(batches)
    assert sum(map(sum, got)) == len({i for b in batches for i in b})
