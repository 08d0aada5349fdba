"""The per-market choice between methods, as plain data (relevance.serving.selection)."""

import pytest

from relevance.serving.selection import Candidate, best_candidate, choose, simpler_choice


def cand(version, method, auc, lo=None, hi=None):
    return Candidate(version, method, {"auc": auc, "ci_low": lo, "ci_high": hi})


LORA, MTL, TOKEN = cand(1, "lora", 0.80), cand(2, "mtl-lora", 0.86), cand(3, "lora-market-token", 0.79)


def edge(diff, lo, hi):
    return {"diff": diff, "ci_low": lo, "ci_high": hi}


def test_a_clear_edge_over_shared_lora_wins():
    c = choose([LORA, MTL, TOKEN], None, edge(0.06, 0.02, 0.10))
    assert c.chosen is MTL and c.simpler is LORA and "excludes 0" in c.reasons[0]


def test_an_edge_inside_the_interval_leaves_the_simpler_choice():
    c = choose([LORA, MTL, TOKEN], None, edge(0.06, -0.01, 0.12))
    assert c.chosen is LORA and "shared LoRA" in c.reasons[0] and "stands" in c.reasons[0]


def test_the_champion_is_the_simpler_choice_while_healthy():
    champ = cand(7, "mtl-lora", 0.84)
    assert simpler_choice([LORA, MTL], champ) is champ
    kept = choose([LORA, MTL], champ, edge(0.02, -0.01, 0.05))
    assert kept.chosen is champ and "champion v7" in kept.reasons[0]
    sick = cand(7, "mtl-lora", 0.52)  # a champion below the floor is no reference to hold on to
    assert simpler_choice([LORA, MTL], sick) is LORA


def test_best_is_shared_lora_itself():
    c = choose([cand(1, "lora", 0.9), MTL], None, None)
    assert c.chosen.method == "lora" and "best valid AUC" in c.reasons[0]


def test_every_candidate_below_the_floor_refuses_the_market():
    low = [cand(1, "lora", 0.55), cand(2, "mtl-lora", None), cand(3, "per-market-lora", 0.51)]
    assert best_candidate(low) is None
    c = choose(low, None, None)
    assert c.chosen is None and "sanity floor" in c.reasons[0] and "no model" in c.reasons[0]
    champ = cand(9, "lora", 0.7)
    assert "champion v9" in choose(low, champ, None).reasons[0]


def test_no_shared_lora_means_best_valid_auc():
    c = choose([MTL, TOKEN], None, None)
    assert c.chosen is MTL and "no champion and no healthy shared-LoRA" in c.reasons[0]


def test_ties_prefer_shared_lora_then_the_older_version():
    assert best_candidate([cand(2, "mtl-lora", 0.8), cand(1, "lora", 0.8)]).method == "lora"
    assert best_candidate([cand(5, "mtl-lora", 0.8), cand(3, "per-market-lora", 0.8)]).version == 3


def test_bad_floor_and_missing_edge_are_errors():
    with pytest.raises(ValueError, match="sanity floor=1.5"):
        choose([LORA], None, None, floor=1.5)
    with pytest.raises(ValueError, match="paired valid difference"):
        choose([LORA, MTL], None, None)
