"""The per-market choice between methods, as plain data (relevance.serving.selection)."""

import pytest

from relevance.serving.selection import Candidate, best_candidate, choose, gate_checks, healthy, simpler_choice


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


FLAT = "score spread 0.0010 < 0.01 (near-constant scores)"


def dead(version, method, auc, *reasons):
    """A candidate whose valid predictions auc_table flagged degenerate (the multilingual-e5 failure)."""
    return Candidate(version, method, {"auc": auc, "ci_low": auc - 0.05, "ci_high": auc + 0.05, "degenerate": True,
                                       "degenerate_reasons": list(reasons or [FLAT])})


def test_a_degenerate_candidate_is_never_chosen_whatever_its_auc():
    flat = dead(2, "mtl-lora", 0.95)
    assert not healthy(flat) and healthy(LORA)
    c = choose([LORA, flat], None, None)
    assert c.chosen is LORA and f"v2 (mtl-lora) 0.9500 ⚠ degenerate: {FLAT}" in c.reasons[0]
    sick_champion = dead(7, "lora", 0.9)
    assert simpler_choice([LORA, MTL], sick_champion) is LORA


def test_a_market_whose_candidates_are_all_degenerate_is_refused_with_the_reasons():
    coin = "AUC 0.600 [0.480, 0.720] is within noise of 0.5"
    c = choose([dead(1, "lora", 0.72), dead(2, "mtl-lora", 0.60, coin)], None, None)
    assert c.chosen is None and "fails the sanity floor" in c.reasons[0] and "degenerate" in c.reasons[0]
    assert FLAT in c.reasons[0] and coin in c.reasons[0] and "no model" in c.reasons[0]


def test_the_gate_sanity_check_fails_a_degenerate_candidate_and_says_why():
    [sanity, *_] = gate_checks(0.72, None, 0.70, False, True, 0.002, candidate_flags=[FLAT])
    assert not sanity.passed and sanity.name == "sanity"
    assert sanity.detail == ("candidate valid AUC 0.7200 > sanity floor 0.55, but its valid predictions are "
                             f"degenerate: {FLAT}")
    assert gate_checks(0.72, None, 0.70, False, True, 0.002)[0].passed  # no flags: unchanged
    assert dead(3, "lora", 0.7).degenerate_reasons == [FLAT] and LORA.degenerate_reasons == []


def test_floor_zero_switches_the_sanity_checks_off_but_still_reports():
    from relevance.serving.selection import gate_checks, healthy

    flat = Candidate(4, "mtl-lora", {"auc": 0.52, "degenerate": True,
                                     "degenerate_reasons": ["score spread 0.0020 < 0.01 (near-constant scores)"]})
    assert not healthy(flat) and healthy(flat, floor=0)
    assert choose([flat], None, None, floor=0).chosen is flat
    check = gate_checks(0.52, None, 0.5, False, True, 0.002, floor=0, candidate_flags=flat.degenerate_reasons)[0]
    assert check.passed and "sanity checks off" in check.detail and "near-constant" in check.detail
