import re
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora.conversion import _find_cutoff_index

from surgery import Budget, Energy, FixedRank, RankMap, SurgeryError
from surgery.rank import PerModule, budget_ranks, energy_rank, parse_count, parse_rank_map


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), tau=st.floats(0.01, 1.0))
def test_energy_rank_matches_peft_and_definition(values, tau):
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = energy_rank(S, tau)
    e = S.square()
    if float(e.sum()) == 0:
        assert k == 1
        return
    assert float(e[:k].sum()) >= tau * float(e.sum()) * (1 - 1e-12)
    assert k == 1 or float(e[: k - 1].sum()) < tau * float(e.sum())
    assert k == min(_find_cutoff_index(S, tau), len(values))


def _dropped(spectra, ranks):
    return sum(float(S[ranks[n]:].square().sum()) for n, S in spectra.items())


def skewed_spectra():
    return {
        "flat": torch.full((16,), 1.0, dtype=torch.float64),
        "steep": 10 * 0.4 ** torch.arange(16, dtype=torch.float64),
        "mid": 3 * 0.8 ** torch.arange(16, dtype=torch.float64),
        "tiny": 0.01 * torch.ones(16, dtype=torch.float64),
    }


@pytest.mark.parametrize("budget", [400, 1000, 2500, 4000])
def test_budget_never_exceeded_and_beats_uniform(budget):
    spectra = skewed_spectra()
    cost = {"flat": 100, "steep": 100, "mid": 60, "tiny": 40}
    ranks = budget_ranks(spectra, cost, budget)
    used = sum(ranks[n] * cost[n] for n in spectra)
    assert used <= budget
    assert all(1 <= ranks[n] <= 16 for n in spectra)
    uniform_k = max(1, budget // sum(cost.values()))
    uniform = {n: min(uniform_k, 16) for n in spectra}
    assert sum(uniform[n] * cost[n] for n in spectra) <= budget
    assert _dropped(spectra, ranks) <= _dropped(spectra, uniform) + 1e-12
    if budget >= 1000:
        assert _dropped(spectra, ranks) < _dropped(spectra, uniform)


def test_budget_is_optimal_on_equal_costs():
    spectra = skewed_spectra()
    cost = {n: 10 for n in spectra}
    ranks = budget_ranks(spectra, cost, 300)
    # with equal costs the greedy pick of the largest σ² is the exact optimum: compare with a brute-force sort
    all_sv = sorted((float(s) ** 2 for S in spectra.values() for s in S[1:]), reverse=True)
    best = sum(all_sv[: 30 - 4])
    kept = sum(float(S[1:ranks[n]].square().sum()) for n, S in spectra.items())
    assert kept == pytest.approx(best)


def test_budget_too_small():
    with pytest.raises(SurgeryError, match="too small"):
        budget_ranks(skewed_spectra(), {n: 100 for n in skewed_spectra()}, 399)


def test_parse_count_and_rank_map():
    assert parse_count("2M") == 2_000_000 and parse_count("1.5k") == 1500 and parse_count("350000") == 350000
    with pytest.raises(SurgeryError):
        parse_count("lots")
    rm = parse_rank_map(["mlp=8,attn=4", r"layers\.1\.=2"])
    assert rm.rules == (("mlp", 8), ("attn", 4), (r"layers\.1\.", 2))
    assert rm.rank_for("model.layers.1.self_attn.q_proj") == 4 and rm.rank_for("lm_head") is None
    for bad in ["mlp", "mlp=x", "(=3", ""]:
        with pytest.raises(SurgeryError):
            parse_rank_map([bad])


@pytest.mark.parametrize("make,message", [
    (lambda: FixedRank(0), "rank must be a whole number of at least 1, got 0"), (lambda: FixedRank(2.5), "got 2.5"),
    (lambda: FixedRank(True), "got True"), (lambda: Energy(0), "energy threshold must be in (0, 1], got 0"),
    (lambda: Energy(float("nan")), "got nan"), (lambda: Energy("0.9"), "got '0.9'"),
    (lambda: Budget(0), "budget must be a positive whole number of parameters, got 0"), (lambda: Budget(1.5), "got 1.5"),
    (lambda: RankMap((("(", 2),)), "rank map entry '('=2: bad regex '('"),  # was re.error at the first module
    (lambda: RankMap((("mlp", 2.5),)), "rank map entry 'mlp'=2.5: the rank must be a whole number"),
    (lambda: PerModule({"m.q_proj": "3"}), "module m.q_proj: the rank must be a whole number, got '3'")])
def test_rules_check_themselves(make, message):
    """A rule of the wrong type or range is a SurgeryError where it is made — the Python API's FixedRank(2.5) was a
    TypeError deep in a slice — for every command that takes one (squeeze, combine, extract)."""
    with pytest.raises(SurgeryError, match=re.escape(message)):
        make()


def test_a_rule_of_another_type_is_named():
    """The Python API given a bare number (or a string) for its rule: squeeze raised `TypeError: 4` from deep
    inside, extract an AttributeError; now one SurgeryError naming the rule types, before any work."""
    from surgery import load_adapter, squeeze
    from surgery.combine import combine
    from surgery.extract import extract

    from .conftest import FIXTURES, PEFT_FIXTURE

    a = load_adapter(PEFT_FIXTURE)
    base = FIXTURES / "tiny-llama"
    for call in (lambda: squeeze(a, 4), lambda: squeeze(a, "4"), lambda: combine([a, a], [1, 1], 4),
                 lambda: extract(base, base, 4), lambda: extract(base, base, parse_rank_map("q=2"))):
        with pytest.raises(SurgeryError, match=r"rank rule .*: expected one of FixedRank"):
            call()
