"""Tests that read like the claims they check. Run: python -m pytest -q test_offpolicy_pessimism.py"""

import builtins
import copy
import dataclasses
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch

import offpolicy_pessimism as op

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
import bench  # noqa: E402  (experiments/bench.py)
import compare  # noqa: E402  (experiments/compare.py)
import curves  # noqa: E402  (experiments/curves.py)
import targets  # noqa: E402  (experiments/targets.py: eq. 2's exact target, on Lambert's W)

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = ["--device", "cpu"]  # every run here is on the CPU whatever torch sees: fp32, eager decoding
TINY = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "16",
        "--eval-every", "3", "--warm-start-steps", "30"]


def main(argv: list[str]) -> int:
    """The script's main() on the CPU, so that exact equalities hold on a machine with a GPU too."""
    return op.main([*CPU, *argv])


def grid_config(argv: list[str]):
    """The flags of experiments/compare.py, parsed."""
    return op.parse_config(argv, compare.GridConfig)


def grid_main(argv: list[str]) -> int:
    """experiments/compare.py's main() on the CPU."""
    return compare.main([*CPU, *argv])


def bench_main(argv: list[str]) -> int:
    """experiments/bench.py's main() on the CPU."""
    return bench.main([*CPU, *argv])


# ---------------------------------------------------------------------------------------------
# The Lambert-W target (eq. 2): eq. 1's minimiser in every regime, on both real branches
# ---------------------------------------------------------------------------------------------
def eq1_loss(pi: torch.Tensor, advantages: torch.Tensor, beta: float, mu: torch.Tensor) -> torch.Tensor:
    """eq. 1 on one group: sum_i mu_i (beta log(pi_i/mu_i) - A_i)^2. pi, advantages, mu: (..., G)."""
    return (mu * (beta * (pi / mu).log() - advantages) ** 2).sum(-1)


def minimise_eq1(advantages_row: torch.Tensor, beta: float, mu_row: torch.Tensor | None = None,
                 starts: int = 8, seed: int = 0) -> torch.Tensor:
    """argmin of eq. 1 over pi = softmax(logits) on one group (G,), by L-BFGS in float64 from several starts: mu,
    one start leaning on each sample (eq. 1's collapsed local minima sit near the vertices), and `starts` random
    ones. Returns the best pi found, (G,)."""
    advantages = advantages_row.double()
    size = advantages.shape[-1]
    mu = torch.full_like(advantages, 1 / size) if mu_row is None else mu_row.double()
    generator = torch.Generator().manual_seed(seed)
    initial = [mu.log()] + [mu.log() + 5 * torch.eye(size, dtype=torch.float64)[k] for k in range(size)]
    initial += [mu.log() + 3 * torch.randn(size, generator=generator, dtype=torch.float64) for _ in range(starts)]
    best_loss, best_pi = math.inf, None
    for start in initial:
        logits = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-15, tolerance_change=1e-18,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = eq1_loss(torch.softmax(logits, -1), advantages, beta, mu)
            loss.backward()
            return loss

        for _ in range(4):
            optimizer.step(closure)
        with torch.no_grad():
            pi = torch.softmax(logits, -1)
            loss = eq1_loss(pi, advantages, beta, mu).item()
        if loss < best_loss:
            best_loss, best_pi = loss, pi
    return best_pi


BETA = 0.1
G = 8


def reward_row(text: str) -> torch.Tensor:
    return torch.tensor([float(r) for r in text.split(",")], dtype=torch.float64)


def mean_baseline(r, shift=0.0):
    """pmd (shift 0) and the beta-shifted mean: A = r - mean + shift * beta."""
    return r - r.mean() + shift * BETA


def oapl_baseline(r, beta_value):
    """A = r - beta_v log mean exp(r / beta_v)."""
    return r - beta_value * (torch.logsumexp(r / beta_value, 0) - math.log(len(r)))


def w0_family_largest_mass(advantages, beta, mu):
    """sum_i pi_i with W0 on every sample at the branch point c exp(max A/beta) = -1/e: the most it reaches, c < 0."""
    z = (advantages / beta).exp()
    c = -1 / (math.e * z.max())
    return (mu * targets.lambert_w0(c * z) / c).sum().item()


# Lambert's W on its two real branches
# ---------------------------------------------------------------------------------------------
def test_lambert_w0_inverts_w_exp_w_above_minus_one():
    z = torch.cat([torch.linspace(-1 / math.e, 0, 1001, dtype=torch.float64),
                   torch.logspace(-8, 8, 1001, dtype=torch.float64)])
    w = targets.lambert_w0(z)
    assert torch.all(w >= -1)
    assert torch.allclose(w * w.exp(), z, rtol=1e-12, atol=1e-12)


def test_lambert_wm1_inverts_w_exp_w_below_minus_one():
    z = -torch.cat([torch.logspace(-300, -1, 1001, dtype=torch.float64),
                    1 / math.e - torch.logspace(-12, -1, 200, dtype=torch.float64),
                    torch.tensor([1 / math.e], dtype=torch.float64)])
    w = targets.lambert_wm1(z)
    assert torch.all(w <= -1)
    assert torch.allclose(w * w.exp(), z, rtol=1e-12, atol=0)  # relative: z spans 300 decades
    assert targets.lambert_wm1(torch.tensor([-0.1], dtype=torch.float64)).item() == pytest.approx(-3.577152063957297,
                                                                                                  rel=1e-14)
    assert targets.lambert_wm1(torch.tensor([-1 / math.e], dtype=torch.float64)).item() == pytest.approx(-1.0, abs=1e-7)


def test_lambert_w_of_exp_agrees_with_the_direct_branches_and_works_past_float_range():
    u = torch.linspace(-30, 5, 301, dtype=torch.float64)
    plus, minus = torch.tensor(1.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    false, true = torch.tensor(False), torch.tensor(True)
    assert torch.allclose(targets.lambert_w_of_exp(plus, u, false), targets.lambert_w0(u.exp()), rtol=1e-13,
                          atol=1e-300)
    u_neg = u[u <= -1]
    assert torch.allclose(targets.lambert_w_of_exp(minus, u_neg, true), targets.lambert_wm1(-u_neg.exp()), rtol=1e-13,
                          atol=0)
    assert torch.allclose(targets.lambert_w_of_exp(minus, u_neg, false), targets.lambert_w0(-u_neg.exp()), rtol=1e-13,
                          atol=1e-300)
    huge = torch.tensor([800.0, 1e5], dtype=torch.float64)  # exp overflows: w + log w = u instead
    w = targets.lambert_w_of_exp(plus, huge, false)
    assert torch.allclose(w + w.log(), huge, rtol=1e-15, atol=0)
    w = targets.lambert_w_of_exp(minus, -huge, true)                  # exp underflows: w + log(-w) = u, w <= -1
    assert torch.all(w <= -1) and torch.allclose(w + (-w).log(), -huge, rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# The closed form is eq. 1's global minimiser, in every regime
# ---------------------------------------------------------------------------------------------
UNIFORM = torch.full((G,), 1 / G, dtype=torch.float64)
SKEWED = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.8, -1.5, 0.0, 0.4, -3.0], dtype=torch.float64), 0)
CASES = {  # name: (advantages, mu or None for the empirical mu, expected regime)
    "pessimistic, shifted +1": (mean_baseline(reward_row("1,1,0,0,0,1,0,0"), 1), None, "positive"),
    "pessimistic, pmd": (mean_baseline(reward_row("1,0,0,0,0,0,0,0")), None, "positive"),
    "pessimistic, mu given": (mean_baseline(reward_row("1,1,0,0,0,1,0,0"), 1), SKEWED, "positive"),
    "boundary, oapl at beta_v = beta": (oapl_baseline(reward_row("1,1,0,0,0,1,0,0"), BETA), None, "boundary"),
    "boundary, pmd on equal rewards": (mean_baseline(reward_row("1,1,1,1,1,1,1,1")), None, "boundary"),
    "negative, equal rewards, shift -0.5": (mean_baseline(reward_row("0,0,0,0,0,0,0,0"), -0.5), None, "negative"),
    "negative, oapl beta_v = beta/2, 2 correct": (oapl_baseline(reward_row("1,1,0,0,0,0,0,0"), BETA / 2), None,
                                                  "negative"),
    "negative, mu given": (oapl_baseline(reward_row("1,1,0,0,0,0,0,0"), BETA / 2), SKEWED, "negative"),
    "collapsed, one correct, A = r - 0.9": (reward_row("1,0,0,0,0,0,0,0") - 0.9, None, "collapsed"),
    "collapsed, equal rewards, shift -2": (mean_baseline(reward_row("1,1,1,1,1,1,1,1"), -2), None, "collapsed"),
    "collapsed, oapl beta_v = beta/2, 1 correct": (oapl_baseline(reward_row("1,0,0,0,0,0,0,0"), BETA / 2), None,
                                                   "collapsed"),
    "collapsed, 7 of 8 correct, shift -2 (W0 still normalises)": (mean_baseline(reward_row("1,1,1,1,1,1,1,0"), -2),
                                                                   None, "collapsed"),
    "collapsed, mu given": (mean_baseline(reward_row("1,1,1,1,1,1,1,1"), -2), SKEWED, "collapsed"),
}


def interchangeable(pi, advantages, mu):
    """pi with the values of each set of samples with equal A and mu sorted (largest first): such samples are
    interchangeable, so eq. 1's minimisers come in permutations of them, and the closed form takes the first one."""
    pi = pi.clone()
    for value in torch.stack([advantages, mu], -1).unique(dim=0):
        tied = ((advantages == value[0]) & (mu == value[1])).nonzero()[:, 0]
        pi[tied] = pi[tied].sort(descending=True).values
    return pi


def regime(target, row=0):
    if target.collapsed[row]:
        return "collapsed"
    return {1: "positive", 0: "boundary", -1: "negative"}[int(target.c[row].sign())]


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_is_the_direct_minimiser_of_eq1(name):
    advantages, mu, expected = CASES[name]
    target = targets.induced_target(advantages[None], BETA, None if mu is None else mu[None])
    assert regime(target) == expected
    mu = UNIFORM if mu is None else mu
    pi = mu * target.ratio[0]
    direct = minimise_eq1(advantages, BETA, mu)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert (pi - interchangeable(direct, advantages, mu)).abs().max().item() < 1e-4
    assert eq1_loss(pi, advantages, BETA, mu).item() <= eq1_loss(direct, advantages, BETA, mu).item() + 1e-9


def test_one_correct_answer_past_the_threshold_collapses_onto_it():
    advantages = reward_row("1,0,0,0,0,0,0,0") - 0.9
    assert w0_family_largest_mass(advantages, BETA, UNIFORM) == pytest.approx(0.924, abs=1e-3)  # W0 cannot normalise
    target = targets.induced_target(advantages[None], BETA)
    pi = target.ratio[0] / G
    assert target.collapsed.item() and target.collapsed_index.item() == 0
    assert pi[0].item() == pytest.approx(0.9999, abs=1e-4)
    assert eq1_loss(pi, advantages, BETA, UNIFORM).item() == pytest.approx(0.0015, abs=1e-4)
    assert eq1_loss(UNIFORM, advantages, BETA, UNIFORM).item() == pytest.approx(0.71, abs=1e-2)  # pi = mu


def test_equal_rewards_shifted_by_minus_two_collapse_onto_the_first_sample():
    advantages = torch.full((G,), -0.2, dtype=torch.float64)
    assert w0_family_largest_mass(advantages, BETA, UNIFORM) == pytest.approx(math.exp(-1), abs=1e-9)  # 0.368
    target = targets.induced_target(advantages[None], BETA)
    pi = target.ratio[0] / G
    assert target.collapsed.item() and target.collapsed_index.item() == 0  # ties: the lowest index
    assert pi[0].item() == pytest.approx(0.871, abs=1e-3)
    assert torch.allclose(pi[1:], torch.full((G - 1,), 0.018, dtype=torch.float64), atol=1e-3)


def test_with_uniform_mu_only_the_largest_advantage_collapses():
    """Trying every sample as the W_-1 candidate (mu passed explicitly) picks the largest A, the first of ties:
    the rearrangement argument that lets targets.induced_target(mu=None) try that one only."""
    generator = torch.Generator().manual_seed(0)
    scaled = torch.randn(300, G, generator=generator, dtype=torch.float64) * 2 - 3  # mostly c < 0, many collapse
    scaled[:50, 1] = scaled[:50, 0] = scaled[:50].max(-1).values + 0.1               # ties at the top
    every_candidate = targets.induced_target(BETA * scaled, BETA, torch.full_like(scaled, 1 / G))
    largest_only = targets.induced_target(BETA * scaled, BETA)
    collapsed = every_candidate.collapsed
    assert collapsed.sum() > 100
    assert torch.equal(collapsed, largest_only.collapsed)
    assert torch.equal(every_candidate.collapsed_index[collapsed], scaled[collapsed].argmax(-1))
    assert torch.equal(largest_only.collapsed_index, every_candidate.collapsed_index)
    assert torch.allclose(every_candidate.ratio, largest_only.ratio, rtol=1e-9, atol=0)


def test_with_mu_given_a_rare_sample_can_collapse_before_the_w0_family_fails():
    """mu = (0.4995, 0.4995, 0.001): the W0 family normalises, yet eq. 1 is lower with the rare third sample on
    W_-1, although the first sample has the larger advantage."""
    mu = torch.tensor([0.4995, 0.4995, 0.001], dtype=torch.float64)
    advantages = BETA * torch.tensor([-0.1, -2.0, -1.0], dtype=torch.float64)
    assert w0_family_largest_mass(advantages, BETA, mu) > 1.2
    target = targets.induced_target(advantages[None], BETA, mu[None])
    assert target.collapsed.item() and target.collapsed_index.item() == 2
    pi = mu * target.ratio[0]
    direct = minimise_eq1(advantages, BETA, mu)
    assert (pi - direct).abs().max().item() < 1e-4
    assert pi[2].item() == pytest.approx(0.474, abs=1e-3)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 1.0])
def test_no_nan_and_a_normalised_stationary_target_over_a_wide_range(beta):
    generator = torch.Generator().manual_seed(1)
    spread = torch.logspace(-2, 0, 400, dtype=torch.float64)[:, None]
    advantages = (torch.randn(400, G, generator=generator, dtype=torch.float64) * spread
                  + torch.randn(400, 1, generator=generator, dtype=torch.float64) * spread)  # A/beta up to ~ +-3/beta
    mu = torch.softmax(torch.randn(400, G, generator=generator, dtype=torch.float64), -1)
    for weights in (None, mu):
        target = targets.induced_target(advantages, beta, weights)
        weights = torch.full_like(advantages, 1 / G) if weights is None else weights
        assert not any(t.isnan().any() for t in target)
        assert torch.allclose((weights * target.ratio).sum(-1), torch.ones(400, dtype=torch.float64), atol=1e-9)
        assert (target.c < 0).sum() > 30 and (target.c > 0).sum() > 30 and target.collapsed.sum() > 10
        # stationarity, eq. 2 in logs: log(pi/mu) - A/beta = -W = -c pi/mu (c is -inf where every A/beta < -745)
        where = (torch.isfinite(target.c) & (target.c != 0))[:, None] & (target.ratio > 1e-300)  # not underflowed
        residual = target.ratio.log() - advantages / beta + target.c[:, None] * target.ratio
        scale = 1 + (advantages / beta).abs().max(-1, keepdim=True).values
        assert (residual / scale)[where].abs().max().item() < 1e-9


# ---------------------------------------------------------------------------------------------
# The regime diagnostics
# ---------------------------------------------------------------------------------------------
def test_regime_diagnostics_split_groups_into_three_signs_of_c_and_the_collapsed_ones_without_nan():
    r = torch.stack([reward_row("1,1,0,0,0,1,0,0"), reward_row("1,1,1,1,1,1,1,1"), reward_row("1,1,0,0,0,0,0,0"),
                     reward_row("1,0,0,0,0,0,0,0")])
    advantages = torch.stack([mean_baseline(r[0], 1), mean_baseline(r[1]), oapl_baseline(r[2], BETA / 2),
                              oapl_baseline(r[3], BETA / 2)])
    metrics = targets.regime_diagnostics(advantages, r, BETA)
    assert "regime_no_target" not in metrics and all(math.isfinite(v) for v in metrics.values())
    assert [metrics[k] for k in ("regime_positive", "regime_boundary", "regime_negative", "regime_collapsed")] == [
        0.25, 0.25, 0.5, 0.25]  # the collapsed group (one correct, oapl at beta_v = beta/2) is among c < 0
    assert metrics["target_max_mass"] > 0.25 * 0.9999  # the collapsed group alone puts 0.9999 on one sample
    assert metrics["p_correct_generator"] == pytest.approx(r.mean().item())
    assert op.regime_shares(advantages, BETA) == {key: metrics[key] for key in
                                                   ("regime_positive", "regime_boundary", "regime_negative")}


def test_pessimistic_target_puts_less_mass_on_correct_answers_than_boltzmann_and_negative_more():
    r = torch.tensor([[1.0, 1, 0, 0, 0, 0, 1, 0]], dtype=torch.float64)
    positive = targets.regime_diagnostics(mean_baseline(r[0], 1)[None], r, BETA)
    negative = targets.regime_diagnostics(oapl_baseline(r[0], BETA / 2)[None], r, BETA)
    assert positive["regime_positive"] == 1 and negative["regime_negative"] == 1
    assert positive["p_correct_induced"] < positive["p_correct_nominal"]
    assert negative["p_correct_induced"] > negative["p_correct_nominal"]


def random_reward_groups(groups=200, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    success = torch.rand(groups, 1, generator=generator)
    return (torch.rand(groups, size, generator=generator) < success).float()


def test_mean_baseline_is_never_in_the_negative_regime():
    rewards = random_reward_groups()
    c = targets.induced_target(rewards - op.group_mean(rewards), beta=0.1).c
    all_equal = (rewards == rewards[:, :1]).all(-1)
    assert all_equal.any() and (~all_equal).any()
    assert torch.all(c[~all_equal] > 0)
    assert torch.all(c[all_equal] == 0)


def test_oapl_value_temperature_sets_the_regime():
    rewards = random_reward_groups()
    mixed = ~(rewards == rewards[:, :1]).all(-1)
    beta = 0.1
    above = targets.induced_target(rewards - op.soft_value(rewards, 2 * beta), beta)
    equal = targets.induced_target(rewards - op.soft_value(rewards, beta), beta)
    below = targets.induced_target(rewards - op.soft_value(rewards, beta / 2), beta)
    assert torch.all(above.c[mixed] > 0) and not above.collapsed.any()
    assert torch.all(equal.c == 0)
    assert torch.all(below.c[mixed] < 0) and not below.ratio.isnan().any()  # a target in every group, no NaN
    # collapsed where the W0 family cannot reach mass 1 (c = -1/(e max z) gives its most) or the top reward is
    # shared; on W0 elsewhere
    z = ((rewards - op.soft_value(rewards, beta / 2)) / beta).double().exp()[mixed]
    c_min = -1 / (math.e * z.max(-1, keepdim=True).values)
    w0_cannot = (targets.lambert_w0(c_min * z) / c_min).mean(-1) < 1
    assert torch.all(below.collapsed[mixed][w0_cannot]) and below.collapsed[mixed].sum() > 0
    assert (below.c[mixed] < 0).sum() > below.collapsed[mixed].sum()  # some groups stay on W0


def test_shifted_mean_is_always_pessimistic_and_neutral_on_equal_rewards():
    rewards = random_reward_groups()
    beta = 0.1
    assert torch.all(targets.induced_target(op.shifted_mean_advantages(rewards, beta), beta).c > 0)
    equal = torch.ones(3, 8) * torch.tensor([[0.0], [1.0], [0.5]])
    target = targets.induced_target(op.shifted_mean_advantages(equal, beta), beta)
    assert torch.allclose(target.c, torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(target.ratio, torch.ones_like(target.ratio), atol=1e-9)  # pi_c = mu


def regime_signs(advantages, beta):
    """The trainer's regime of each group as the sign of c (1, 0, -1): op.regime_shares on that group alone."""
    shares = [op.regime_shares(row[None], beta) for row in advantages]
    return torch.tensor([s["regime_positive"] - s["regime_negative"] for s in shares], dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_the_trainers_regime_is_the_sign_of_the_solved_c_in_every_group(beta):
    """regime_shares takes the sign of log mean exp(A/beta), no W: on groups of 0/1 and of uniform rewards, with the
    mean, soft-value and shifted baselines (both signs of c, collapsed targets included), it is the sign of the c
    that induced_target solves for."""
    rewards = torch.cat([random_reward_groups(groups=60, seed=1),
                         torch.rand(60, G, generator=torch.Generator().manual_seed(2))]).double()
    baselines = {"mean": op.group_mean(rewards), "shifted +1": op.group_mean(rewards) - beta,
                 "shifted -2": op.group_mean(rewards) + 2 * beta, "shifted -0.5": op.group_mean(rewards) + beta / 2,
                 **{f"soft value beta_v={k:g} beta": op.soft_value(rewards, k * beta) for k in (0.5, 1, 2)}}
    seen = set()
    for name, baseline in baselines.items():
        advantages = rewards - baseline                                                   # (groups, G)
        target = targets.induced_target(advantages, beta)
        assert torch.equal(regime_signs(advantages, beta), target.c.sign()), name
        seen |= set(target.c.sign().tolist()) | ({"collapsed"} if target.collapsed.any() else set())
    assert seen == {1.0, 0.0, -1.0, "collapsed"}  # every regime was checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_rewards_under_pmd_and_oapl_at_beta_v_equal_beta_are_the_boundary_despite_round_off(dtype):
    """c = 0 exactly in theory. In the advantages' dtype pmd on equal rewards of 0.7 leaves an ulp, and oapl's soft
    value more: regime_shares' tolerance absorbs both at every beta and group size."""
    for size in (2, 8, 64):
        equal = torch.tensor([[0.0], [1.0], [0.7], [1 / 3]], dtype=dtype).expand(4, size)
        mixed = (torch.rand(200, size, generator=torch.Generator().manual_seed(size)) < 0.5).to(dtype)
        for beta in (1e-3, 0.1, 10.0):
            assert op.regime_shares(equal - op.group_mean(equal), beta)["regime_boundary"] == 1.0
            assert op.regime_shares(mixed - op.soft_value(mixed, beta), beta)["regime_boundary"] == 1.0


# ---------------------------------------------------------------------------------------------
# The eight losses: values and gradient signs on hand-made inputs
# ---------------------------------------------------------------------------------------------
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # one group: the first completion is the correct one
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)


def loss_and_grad(name, policy_minus_behavior=0.0):
    behavior_logp = torch.full((4, 3), -1.0) * MASK
    policy_logp = (behavior_logp + policy_minus_behavior * MASK).requires_grad_(True)
    args = {
        "ppo": lambda: op.ppo_loss(policy_logp, behavior_logp, MASK, REWARDS, 0.2),
        "tis": lambda: op.tis_loss(policy_logp, behavior_logp, MASK, REWARDS, 2.0),
        "reinforce": lambda: op.reinforce_loss(policy_logp, MASK, REWARDS, 0.1),
        "oapl": lambda: op.oapl_loss(policy_logp, behavior_logp, MASK, REWARDS, 0.1, 0.2),
        "apo": lambda: op.apo_loss(policy_logp, behavior_logp, MASK, REWARDS, torch.tensor([[0.5]]), 0.1),
        "pmd": lambda: op.pmd_loss(policy_logp, behavior_logp, MASK, REWARDS, 0.1),
        "shifted": lambda: op.shifted_loss(policy_logp, behavior_logp, MASK, REWARDS, 0.1, 1.0),
        "centred": lambda: op.centred_loss(policy_logp, behavior_logp, MASK, REWARDS, 0.1),
    }
    loss, diagnostics = args[name]()
    loss.backward()
    return loss.item(), policy_logp.grad, diagnostics


@pytest.mark.parametrize("name", op.LOSSES)
def test_every_loss_raises_the_correct_completion_and_lowers_the_wrong_ones(name):
    _, grad, diagnostics = loss_and_grad(name)
    assert diagnostics["advantages"].shape == REWARDS.shape
    assert torch.all(grad[0][MASK[0]] < 0)  # gradient descent raises log pi of the rewarded completion
    for row in (1, 2, 3):
        assert torch.all(grad[row][MASK[row]] > 0)
    assert torch.all(grad[~MASK] == 0)  # nothing past the first EOS is trained


# Two groups of three completions with lengths 3, 2, 1 / 2, 3, 3 and per-token ratios pi/mu chosen on both
# sides of PPO's trust region and TIS's cap; every value below is computed in plain Python.
HAND_REWARDS = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
HAND_LENGTHS = [3, 2, 1, 2, 3, 3]
HAND_RATIOS = [[1.5, 0.9, 1.1], [0.5, 1.3], [2.5], [0.7, 1.05], [1.6, 3.0, 0.95], [0.6, 1.25, 1.0]]
HAND_BEHAVIOR = [[-0.5, -1.0, -2.0], [-0.3, -0.7], [-1.2], [-0.4, -0.9], [-1.5, -0.2, -0.6], [-0.8, -1.1, -0.3]]


def hand_batch():
    """(policy_logp leaf, behavior_logp, mask, rewards) as tensors, padded to 3 tokens."""
    behavior, policy = torch.zeros(6, 3), torch.zeros(6, 3)
    for row, (ratios, logps) in enumerate(zip(HAND_RATIOS, HAND_BEHAVIOR)):
        for t, (ratio, logp) in enumerate(zip(ratios, logps)):
            behavior[row, t], policy[row, t] = logp, logp + math.log(ratio)
    mask = op.mask_from_lengths(torch.tensor(HAND_LENGTHS), 3)
    return policy.requires_grad_(True), behavior, mask, torch.tensor(HAND_REWARDS)


def hand_grpo_advantages():
    advantages = []
    for group in HAND_REWARDS:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))  # population std
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    return advantages


def test_grpo_advantage_divides_by_the_population_std():
    expected = hand_grpo_advantages()
    assert expected[0] == pytest.approx((1 - 1 / 3) / (math.sqrt(2) / 3 + 1e-4))
    assert op.grpo_advantages(torch.tensor(HAND_REWARDS)).flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_ppo_value_and_gradient_by_hand_with_both_clip_sides():
    eps, advantages = 0.2, hand_grpo_advantages()
    objective, gradient, clipped = 0.0, [], 0
    for row, ratios in enumerate(HAND_RATIOS):
        a, row_gradient = advantages[row], []
        for ratio in ratios:
            outside = (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)  # the clip's side for A's sign
            objective += min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a) / len(ratios) / 6
            row_gradient.append(0.0 if outside else -ratio * a / len(ratios) / 6)
            clipped += abs(ratio - 1) > eps
        gradient.append(row_gradient + [0.0] * (3 - len(ratios)))
    policy_logp, behavior_logp, mask, rewards = hand_batch()
    loss, diagnostics = op.ppo_loss(policy_logp, behavior_logp, mask, rewards, eps)
    loss.backward()
    assert loss.item() == pytest.approx(-objective, rel=1e-6)
    assert policy_logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in gradient]
    assert policy_logp.grad[0, 0] == 0 and policy_logp.grad[1, 0] == 0  # clipped above (A > 0) and below (A < 0)
    assert policy_logp.grad[2, 0] != 0 and policy_logp.grad[3, 0] != 0  # the other sides are not clipped
    assert diagnostics["clip_fraction"] == pytest.approx(clipped / sum(HAND_LENGTHS))
    assert diagnostics["ratio_max"] == pytest.approx(3.0) and diagnostics["ratio_mean"] == pytest.approx(
        sum(map(sum, HAND_RATIOS)) / sum(HAND_LENGTHS))


def test_tis_value_and_gradient_by_hand_with_the_cap():
    cap, advantages = 2.0, hand_grpo_advantages()
    loss_by_hand, gradient = 0.0, []
    for row, (ratios, behavior) in enumerate(zip(HAND_RATIOS, HAND_BEHAVIOR)):
        weights = [min(ratio, cap) for ratio in ratios]
        loss_by_hand -= sum(w * advantages[row] * (b + math.log(r)) for w, b, r in zip(weights, behavior, ratios)) \
            / len(ratios) / 6
        gradient.append([-w * advantages[row] / len(ratios) / 6 for w in weights] + [0.0] * (3 - len(ratios)))
    policy_logp, behavior_logp, mask, rewards = hand_batch()
    loss, diagnostics = op.tis_loss(policy_logp, behavior_logp, mask, rewards, cap)
    loss.backward()
    assert loss.item() == pytest.approx(loss_by_hand, rel=1e-6)
    assert policy_logp.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in gradient]
    assert diagnostics["clip_fraction"] == pytest.approx(2 / sum(HAND_LENGTHS))  # 2.5 and 3.0 are capped


def hand_log_ratios(length_normalize=False):
    """d_i = sum_t log(pi/mu), or its mean over the tokens."""
    return [sum(map(math.log, ratios)) / (len(ratios) if length_normalize else 1) for ratios in HAND_RATIOS]


def hand_regression(advantages, beta, log_ratios=None):
    """eq. 1 on the batch: mean_i (beta d_i - A_i)^2."""
    log_ratios = log_ratios or hand_log_ratios()
    return sum((beta * d - a) ** 2 for d, a in zip(log_ratios, advantages)) / 6


def group_means(values):
    return [sum(values[3 * g: 3 * g + 3]) / 3 for g in (0, 0, 0, 1, 1, 1)]


def test_every_other_loss_value_by_hand():
    policy_logp, behavior_logp, mask, rewards = hand_batch()
    reference_logp = behavior_logp - 0.25 * mask  # pi_ref: e^-0.25 of mu on every token
    ref_value = torch.tensor([[0.4], [0.9]])
    r = [reward for group in HAND_REWARDS for reward in group]
    mean = group_means(r)
    beta, beta_value, shift, delta = 0.1, 0.2, 1.0, 0.1
    soft = [beta_value * math.log(sum(math.exp(x / beta_value) for x in HAND_REWARDS[g]) / 3)
            for g in (0, 0, 0, 1, 1, 1)]
    d = hand_log_ratios()
    centred_d = [x - m for x, m in zip(d, group_means(d))]
    sequence_logp = [sum(b + math.log(ratio) for b, ratio in zip(bs, rs)) for bs, rs in zip(HAND_BEHAVIOR, HAND_RATIOS)]
    expected = {
        "reinforce": -sum((ri - m + delta) * s for ri, m, s in zip(r, mean, sequence_logp)) / 6,
        "reinforce, length-normalised": -sum((ri - m + delta) * s / n for ri, m, s, n in
                                             zip(r, mean, sequence_logp, HAND_LENGTHS)) / 6,
        "oapl": hand_regression([ri - v for ri, v in zip(r, soft)], beta),
        "apo": hand_regression([ri - v for ri, v in zip(r, [0.4] * 3 + [0.9] * 3)], beta,
                               [x + 0.25 * n for x, n in zip(d, HAND_LENGTHS)]),
        "pmd": hand_regression([ri - m for ri, m in zip(r, mean)], beta),
        "shifted": hand_regression([ri - m + shift * beta for ri, m in zip(r, mean)], beta),
        "shifted, length-normalised": hand_regression([ri - m + shift * beta for ri, m in zip(r, mean)], beta,
                                                      hand_log_ratios(length_normalize=True)),
        "centred": hand_regression([ri - m for ri, m in zip(r, mean)], beta, centred_d),
    }
    computed = {
        "reinforce": op.reinforce_loss(policy_logp, mask, rewards, delta),
        "reinforce, length-normalised": op.reinforce_loss(policy_logp, mask, rewards, delta, length_normalize=True),
        "oapl": op.oapl_loss(policy_logp, behavior_logp, mask, rewards, beta, beta_value),
        "apo": op.apo_loss(policy_logp, reference_logp, mask, rewards, ref_value, beta),
        "pmd": op.pmd_loss(policy_logp, behavior_logp, mask, rewards, beta),
        "shifted": op.shifted_loss(policy_logp, behavior_logp, mask, rewards, beta, shift),
        "shifted, length-normalised": op.shifted_loss(policy_logp, behavior_logp, mask, rewards, beta, shift,
                                                      length_normalize=True),
        "centred": op.centred_loss(policy_logp, behavior_logp, mask, rewards, beta),
    }
    for name, value in expected.items():
        assert computed[name][0].item() == pytest.approx(value, rel=1e-5), name
    # the regression gradient on token t of completion i: 2 beta (beta d_i - A_i) / N, the same on each of its tokens
    computed["shifted"][0].backward()
    shifted_advantages = [ri - m + shift * beta for ri, m in zip(r, mean)]
    for row, n in enumerate(HAND_LENGTHS):
        expected_gradient = 2 * beta * (beta * d[row] - shifted_advantages[row]) / 6
        assert policy_logp.grad[row, :n].tolist() == pytest.approx([expected_gradient] * n, rel=1e-5)
        assert torch.all(policy_logp.grad[row, n:] == 0)


# ---------------------------------------------------------------------------------------------
# The lagged generator
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = op.builtin_model()
    return model.eval(), tokenizer


def noise(rows: int, max_new_tokens: int, seed: int = 0) -> torch.Tensor:
    """Sampling uniforms for `rows` completions of at most max_new_tokens."""
    return op.fixed_uniforms(f"test|{seed}", rows, max_new_tokens)


def test_behavior_logprobs_equal_the_policy_at_staleness_zero(tiny):
    model, tokenizer = tiny
    prompts = ["7+3=", "45+21=", "99+29=", "0+0="]  # different lengths: left padding is exercised
    rollout = op.sample_groups(model, tokenizer, prompts, 4, 6, 0.7, noise(16, 6))
    policy_logp, _ = op.completion_logprobs(model, rollout, 0.7)
    assert rollout.prompt_mask.sum(-1).unique().numel() > 1
    difference = (policy_logp.detach() - rollout.behavior_logp)[rollout.completion_mask]
    assert difference.abs().max().item() < 1e-5  # ratio 1 within 1e-5


def test_masks_come_from_the_first_eos_even_when_pad_equals_eos(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    prompt_ids = op.encode_prompts(tokenizer, ["12+3="] * 64)
    rollout = op.sample_completions(model, prompt_ids, 8, 3.0, eos, eos, noise(64, 8, 1))
    ended = 0
    for tokens, mask, logp in zip(rollout.completion_ids.tolist(), rollout.completion_mask, rollout.behavior_logp):
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        ended += eos in tokens
        assert mask.tolist() == [t < length for t in range(len(tokens))]
        assert torch.all(logp[~mask] == 0)
    assert 0 < ended < 64  # both cases occur


def test_refresh_copies_the_policy_in_place(tiny):
    policy = op.build_tiny_model(tiny[1], seed=1)
    generator = op.frozen_copy(op.build_tiny_model(tiny[1], seed=2))
    pointers = [t.data_ptr() for t in generator.state_dict().values()]
    op.refresh_generator(generator, policy)
    assert pointers == [t.data_ptr() for t in generator.state_dict().values()]
    for g, p in zip(generator.parameters(), policy.parameters()):
        assert torch.equal(g, p) and not g.requires_grad
    other_shape = op.build_tiny_model(op.build_char_tokenizer(), seed=1)
    other_shape.resize_token_embeddings(40)  # another vocabulary: load_state_dict checks names and shapes
    with pytest.raises(RuntimeError, match="size mismatch"):
        op.refresh_generator(generator, other_shape)


def test_mass_leakage_sums_each_distinct_completion_once_per_group():
    # two groups of 4; in the first, rows 0 and 1 are one completion (what follows its EOS, 2, is not part of it)
    ids = torch.tensor([[5, 2, 9], [5, 2, 0], [6, 2, 0], [7, 2, 0], [5, 2, 0], [6, 6, 2], [7, 2, 0], [8, 8, 2]])
    mask = op.mask_from_lengths(torch.tensor([2, 2, 2, 2, 2, 3, 2, 3]), 3)
    behavior = torch.tensor([-1.0, -1.0, -2.0, -3.0, -1.5, -2.5, -0.5, -4.0])
    assert op.mass_leakage(behavior, behavior, ids, mask, 4)["mass_leakage"] == pytest.approx(1.0)
    policy = behavior + torch.tensor([-1.0, -1.0, 0.5, -2.0, 0.0, -0.3, -1.0, 0.2])  # a different move per completion
    first = [(-1.0 - 1.0, -1.0), (-2.0 + 0.5, -2.0), (-3.0 - 2.0, -3.0)]  # (log pi, log mu) of its 3 distinct
    second = [(-1.5, -1.5), (-2.5 - 0.3, -2.5), (-0.5 - 1.0, -0.5), (-4.0 + 0.2, -4.0)]
    leakage = [sum(math.exp(p) for p, _ in group) / sum(math.exp(m) for _, m in group) for group in (first, second)]
    result = op.mass_leakage(policy, behavior, ids, mask, 4)
    assert result["mass_leakage"] == pytest.approx(sum(leakage) / 2, rel=1e-6)
    covered = [sum(math.exp(m) for _, m in group) for group in (first, second)]
    assert result["generator_mass_sampled"] == pytest.approx(sum(covered) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The reward checker
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, answer, expected", [
    ("\\boxed{46}", "46", 1.0), ("the answer is \\boxed{46}", "46", 1.0), ("12 then \\boxed{46}", "46", 1.0),
    ("\\boxed{46} then 12", "46", 1.0), ("#### 1,234", "1234", 1.0), ("so #### 5, not 7", "5", 1.0),
    ("\\boxed{-7}", "-7", 1.0), ("\\boxed{-7}", "7", 0.0), ("\\boxed{46.0}", "46", 1.0), ("\\boxed{+46}", "46", 1.0),
    ("\\boxed{4 6}", "46", 0.0), ("", "0", 0.0), ("no number", "0", 0.0),
    ("46", "46", 0.0), ("the answer is 46", "46", 0.0), ("12 then 46", "46", 0.0),  # no `####`, no box: no answer
])
def test_math_checker_cases(completion, answer, expected):
    assert op.math_reward(completion, answer) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("46", "46", 1.0), ("046", "46", 1.0), ("=46", "46", 1.0), ("+46.0", "46", 1.0), ("12 then 46", "46", 1.0),
    ("46 then 12", "46", 0.0), ("-46", "46", 0.0), ("4 6", "46", 0.0), ("4.6", "46", 0.0), ("", "0", 0.0),
    ("####46", "46", 1.0), ("0+0=0", "0", 1.0),
])
def test_builtin_task_reward_reads_the_last_number(completion, answer, expected):
    assert op.reward(completion, answer) == expected


def test_math_checker_scores_no_unmarked_text_that_the_builtin_task_reward_scores_by_its_last_number():
    rng = op.random.Random(0)
    alphabet = "0123456789+-=., "
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(20000)]
    texts += [f"{a}{sep}{b}" for a in range(0, 130, 7) for b in range(0, 130, 9) for sep in "+-=. ,"]
    rewarded = 0
    for text in texts:
        for answer in {"0", "5", "46", "128", *re.findall(r"[0-9]+", text)[-1:]}:
            assert op.math_reward(text, answer) == 0.0, (text, answer)  # no `####`, no box: no answer
            rewarded += op.reward(text, answer)
    assert rewarded > 10000  # the built-in task's reward reads the last number: it scores these texts


MATH_CASES = {  # name: (completion, reference answer, reward)
    "gsm8k final mark": ("She pays 3 * 4 = 12.\n#### 12", "Total: 3 * 4 = 12\n#### 12", 1.0),
    "gsm8k commas": ("#### 1,234,567", "1234567", 1.0),
    "gsm8k dollar sign": ("#### $18", "18", 1.0),
    "boxed nested braces": ("so \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}", 1.0),
    "two boxes that disagree score 0": ("\\boxed{1} no, \\boxed{2}", "2", 0.0),
    "two boxes that agree": ("\\boxed{2}, that is \\boxed{\\frac{4}{2}}", "2", 1.0),
    "final mark and box agree": ("\\boxed{12}\n#### 12", "12", 1.0),
    "final mark and box disagree": ("\\boxed{13}\n#### 12", "12", 0.0),
    "boxed unbalanced is no answer": ("\\boxed{\\frac{1}{2}", "1", 0.0),
    "frac equals decimal": ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    "slash equals frac": ("the answer is \\boxed{1/2}", "\\frac{1}{2}", 1.0),
    "decimal equals slash": ("\\boxed{0.5}", "1/2", 1.0),
    "dfrac is frac": ("\\boxed{\\dfrac{3}{4}}", "\\frac34", 1.0),
    "negative frac": ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    "negative is not positive": ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", 0.0),
    "negative number": ("\\boxed{-7}", "-7", 1.0),
    "latex thousands": ("\\boxed{11,\\! 111,\\! 100}", "11111100", 1.0),
    "braced latex thousands": ("\\boxed{14{,}916}", "$14916$", 1.0),
    "text units": ("\\boxed{5.4 \\text{ cents}}", "5.4", 1.0),
    "plain units": ("\\boxed{18 dollars}", "18", 1.0),
    "textnormal units": ("The distance is $\\boxed{125\\textnormal{ miles}}.$", "$125$ miles", 1.0),
    "unmarked answer is no answer": ("The answer is 12.", "12", 0.0),
    "boxed trailing period": ("\\boxed{12.}", "12", 1.0),
    "degrees": ("\\boxed{90^\\circ}", "90", 1.0),
    "percent": ("\\boxed{10\\%}", "10", 1.0),
    "variable prefix": ("\\boxed{x = 5}", "5", 1.0),
    "tuple with left right": ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", 1.0),
    "symbolic mismatch": ("\\boxed{2\\sqrt{3}}", "3\\sqrt{2}", 0.0),
    "tuple is not a thousands number": ("\\boxed{(1,234)}", "1234", 0.0),
    "zero denominator": ("\\boxed{1/0}", "1", 0.0),
}


@pytest.mark.parametrize("name", MATH_CASES)
def test_math_checker_case(name):
    completion, answer, expected = MATH_CASES[name]
    assert op.math_reward(completion, answer) == expected


# The four wrong answers the checker accepted on Math-Verify's own test suite (issue 35): name: (completion,
# reference answer, the case in experiments/math_verify_cases.jsonl).
REWARD_HACKS = {
    "golden ratio for 2": ("$\\frac{1+\\sqrt{5}}{2}$", "$2$", "tests/test_all.py::test_complex_math_expressions[10]"),
    "two numbers for one": ("is $\\boxed{32, 349}$", " So the answer is: \\[ \\boxed{32349} \\]",
                            "tests/test_all.py::test_math_extraction_additional_cases[24]"),
    "last digit of a word": ("AZYUK2A", "2", "tests/test_all.py::test_number_extraction[18]"),
    "last digit of an interval": ("$-[0,1)$", "$1$", "tests/test_all.py::test_sets_handling[4]"),
}


@pytest.mark.parametrize("name", REWARD_HACKS)
def test_math_checker_rewards_no_reward_hack_of_math_verifys_tests(name):
    completion, answer, source = REWARD_HACKS[name]
    assert op.math_reward(completion, answer) == 0.0
    assert any(case["source"] == source for case in math_verify_cases()[1])


def test_the_golden_ratio_and_two_numbers_are_no_answer_even_boxed():
    assert op.math_reward("\\boxed{\\frac{1+\\sqrt{5}}{2}}", "2") == 0.0
    assert op.math_reward("\\boxed{32, 349}", "32349") == op.math_reward("\\boxed{4 6}", "46") == 0.0
    assert op.math_reward("\\boxed{32,349}", "32349") == 1.0  # a thousands comma has no space after it


MATH_VERIFY_CASES = os.path.join(HERE, "experiments", "math_verify_cases.jsonl")


def math_verify_cases() -> tuple[dict, list[dict]]:
    """The header that names the source, and the (gold, prediction, match, source) cases."""
    with open(MATH_VERIFY_CASES, encoding="utf-8") as f:
        header, *cases = map(json.loads, f)
    return header, cases


def test_math_checker_accepts_no_wrong_answer_of_math_verifys_own_test_suite():
    header, cases = math_verify_cases()
    assert header["repository"] == "https://github.com/huggingface/Math-Verify" and "Apache-2.0" in header["licence"]
    assert len(cases) == 268 and sum(not case["match"] for case in cases) == 41
    accepted = [case for case in cases if op.math_reward(case["prediction"], case["gold"]) == 1.0]
    assert [case["source"] for case in accepted if not case["match"]] == []
    assert len(accepted) >= 53  # and it still accepts the right answers it accepted when this test was written


def test_half_has_one_normal_form():
    assert op.normalize_answer("0.5") == op.normalize_answer("1/2") == op.normalize_answer("\\frac{1}{2}") == \
        op.normalize_answer("\\dfrac12") == op.Fraction(1, 2)


SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "gsm8k")), reason="../shared/data/gsm8k is absent")
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_real_gsm8k_final_answer_parses_as_a_number(split):
    with open(os.path.join(SHARED_DATA, "gsm8k", f"{split}.jsonl")) as f:
        answers = [json.loads(line)["answer"] for line in f]
    unparsed = [a[-40:] for a in answers if not isinstance(op.normalize_answer(op.reference_answer(a)), op.Fraction)]
    assert len(answers) > 1000 and unparsed == []


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "math500")), reason="../shared/data/math500 is absent")
def test_real_math500_boxed_answers_match_their_answer_field():
    with open(os.path.join(SHARED_DATA, "math500", "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    misses = [(row["answer"], op.extract_answer(row["solution"])) for row in rows
              if op.math_reward(row["solution"], row["answer"]) != 1.0]
    assert len(rows) == 500 and len(misses) <= 0.02 * len(rows), misses


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('rm -rf /')", "print(40 + 6)", "1" * 10_000_000, "\u0664\u0666", "\uff14\uff16", "4" * 200,
    "\\boxed{__import__('os')}", "#### 9" * 100,
])
def test_reward_checker_parses_never_executes_and_scans_a_bounded_text_on_hostile_strings(hostile, monkeypatch):
    scanned = []  # the length of every text one of the checker's regular expressions ran on

    class Recording:
        def __init__(self, wrapped):
            self.wrapped = wrapped

        def __getattr__(self, name):
            def run(*args, **kwargs):
                scanned.append(len(args[-1]))  # the text: the last argument of findall, fullmatch and sub
                return getattr(self.wrapped, name)(*args, **kwargs)
            return run

    for name in ("re", "_FINAL_MARK", "_LATEX_THOUSANDS", "_LATEX_SPACING", "_LATEX_TEXT", "_UNIT_WORDS", "_FRACTION"):
        monkeypatch.setattr(op, name, Recording(getattr(op, name)))
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, lambda *args, **kwargs: pytest.fail("the checker executed its input"))
    assert op.math_reward(hostile, "46") == 0.0
    assert scanned and max(scanned) <= op.MAX_CHECKED_CHARS
    if len(hostile) > op.MAX_CHECKED_CHARS:
        assert max(scanned) <= len("46")  # only the reference answer was parsed: the completion was refused unread


# ---------------------------------------------------------------------------------------------
# The wiring: every flag reaches its loss, every reward its prompt, and A*-PO's reference is pi_ref
# ---------------------------------------------------------------------------------------------
WIRING_BATCH = [("7+3=", "10"), ("45+21=", "66"), ("99+29=", "128")]  # 3 prompts x 4 completions


def even_length_checker(completion: str, answer: str) -> float:
    """A stand-in checker that gives an untrained model mixed rewards: 1 for an even-length completion."""
    return float(len(completion) % 2 == 0)


def moved(model, seed: int, scale: float = 0.05):
    """A copy of the model with every weight moved by scale * N(0, 1): another policy, ratios away from 1."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def wiring_run(tiny, argv, monkeypatch, steps=1):
    """rl_step as train() calls it, for `steps` steps with the flags `argv`, from a generator that differs
    from the policy (its first batch is stale). Returns the models and optimizer, the policy as RL started,
    for each step (the policy before it, its StepResult, the gradient it applied), and the parsed flags."""
    monkeypatch.setitem(op.CHECKERS, "arith", even_length_checker)
    model, tokenizer = tiny
    cfg = op.parse_config([*CPU, "--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "5",
                           "--grad-clip", "1e9", *argv])  # no gradient clipping: the raw gradient is compared
    models = op.prepare_models(cfg, copy.deepcopy(model), tokenizer, torch.device("cpu"), "fp32")
    start = copy.deepcopy(models.policy)
    models.generator.load_state_dict(moved(model, seed=5).state_dict())
    steps_taken, ref_values = [], {}
    for step in range(1, steps + 1):
        before = copy.deepcopy(models.policy)
        staleness = step % cfg.lag  # the first batch comes from the moved generator, not a refreshed one
        if staleness == 0:
            op.refresh_generator(models.generator, models.policy)
        result = op.rl_step(cfg, models, tokenizer, WIRING_BATCH, staleness,
                            op.fixed_uniforms(f"wiring|{step}", 12, cfg.max_new_tokens), ref_values,
                            op.CHECKERS[cfg.checker])  # the checker train() passes: even_length_checker here
        steps_taken.append((before, result, [p.grad.clone() for p in models.policy.parameters()]))
    return models, start, steps_taken, cfg


def loss_and_gradient(policy, result, loss_of):
    """loss_of(policy_logp, batch) and its gradient with respect to the policy's weights."""
    policy_logp, _ = op.completion_logprobs(policy, result.rollout, 1.0)
    loss, _ = loss_of(policy_logp, result.rollout, result.rewards)
    return loss, torch.autograd.grad(loss, list(policy.parameters()))


def shifted(shift=1.0, length_normalize=False, beta=0.1):
    return lambda logp, batch, rewards: op.shifted_loss(logp, batch.behavior_logp, batch.completion_mask, rewards,
                                                        beta, shift, length_normalize)


WIRING = {  # flag: (the flags, the loss called directly with the flag's value, the same loss at the default)
    "--shift": (["--loss", "shifted", "--shift", "-0.5"], shifted(shift=-0.5), shifted()),
    "--beta": (["--loss", "pmd", "--beta", "0.3"],
               lambda lp, b, r: op.pmd_loss(lp, b.behavior_logp, b.completion_mask, r, beta=0.3),
               lambda lp, b, r: op.pmd_loss(lp, b.behavior_logp, b.completion_mask, r, beta=0.1)),
    "--beta-value": (["--loss", "oapl", "--beta-value", "0.05"],  # swapped with --beta it would read 0.1, 0.05
                     lambda lp, b, r: op.oapl_loss(lp, b.behavior_logp, b.completion_mask, r, 0.1, beta_value=0.05),
                     lambda lp, b, r: op.oapl_loss(lp, b.behavior_logp, b.completion_mask, r, 0.1, beta_value=0.2)),
    "--delta": (["--loss", "reinforce", "--delta", "0.4"],
                lambda lp, b, r: op.reinforce_loss(lp, b.completion_mask, r, delta=0.4),
                lambda lp, b, r: op.reinforce_loss(lp, b.completion_mask, r, delta=0.1)),
    "--clip-eps": (["--loss", "ppo", "--clip-eps", "0.02"],
                   lambda lp, b, r: op.ppo_loss(lp, b.behavior_logp, b.completion_mask, r, clip_eps=0.02),
                   lambda lp, b, r: op.ppo_loss(lp, b.behavior_logp, b.completion_mask, r, clip_eps=0.2)),
    "--is-cap": (["--loss", "tis", "--is-cap", "1.02"],
                 lambda lp, b, r: op.tis_loss(lp, b.behavior_logp, b.completion_mask, r, is_cap=1.02),
                 lambda lp, b, r: op.tis_loss(lp, b.behavior_logp, b.completion_mask, r, is_cap=2.0)),
    "--length-normalize": (["--loss", "shifted", "--length-normalize"], shifted(length_normalize=True), shifted()),
    "--length-normalize (reinforce)": (
        ["--loss", "reinforce", "--length-normalize"],
        lambda lp, b, r: op.reinforce_loss(lp, b.completion_mask, r, delta=0.1, length_normalize=True),
        lambda lp, b, r: op.reinforce_loss(lp, b.completion_mask, r, delta=0.1)),
}


def assert_same_loss_and_gradient(got, expected):
    (loss, gradient), (expected_loss, expected_gradient) = got, expected
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-7)
    for g, e in zip(gradient, expected_gradient):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)


def assert_other_loss_and_gradient(got, other):
    (loss, gradient), (other_loss, other_gradient) = got, other
    assert abs(loss.item() - other_loss.item()) > 1e-3 * max(abs(other_loss.item()), 1e-2)
    largest = max(e.abs().max() for e in other_gradient)
    assert max((g - e).abs().max() for g, e in zip(gradient, other_gradient)) > 1e-3 * largest


@pytest.mark.parametrize("flag", WIRING)
def test_each_loss_flag_reaches_the_update_with_its_value(flag, tiny, monkeypatch):
    argv, with_flag, at_default = WIRING[flag]
    _, _, [(before, result, gradient)], _ = wiring_run(tiny, argv, monkeypatch)
    assert 0 < result.rewards.mean() < 1 and result.rollout.staleness == 1
    taken = (result.loss, gradient)
    assert_same_loss_and_gradient(taken, loss_and_gradient(before, result, with_flag))
    assert_other_loss_and_gradient(taken, loss_and_gradient(before, result, at_default))
    if flag in ("--clip-eps", "--is-cap"):  # the new bound does cut some tokens, on both sides for ppo
        assert 0 < result.diagnostics["clip_fraction"] < 1


def test_truncated_mask_flag_drops_cut_completions_from_the_gradient_not_from_the_baseline(tiny, monkeypatch):
    flags = ["--loss", "shifted", "--truncated", "mask"]
    _, _, [(before, result, gradient)], _ = wiring_run(tiny, flags, monkeypatch)
    batch, rewards = result.rollout, result.rewards
    texts = op.completion_texts(tiny[1], batch)
    assert 0 < int(batch.truncated.sum()) < 12
    assert rewards.flatten().tolist() == [even_length_checker(t, "") for t in texts]  # cut ones keep their reward
    assert torch.equal(result.diagnostics["advantages"], rewards - rewards.mean(-1, keepdim=True) + 0.1)
    kept = batch.completion_mask & ~batch.truncated[:, None]

    def masked(logp, batch, rewards):
        return op.shifted_loss(logp, batch.behavior_logp, kept, rewards, 0.1, 1.0)

    def zeroed(logp, batch, rewards):  # the default, --truncated zero: every completion trained, cut ones reward 0
        return op.shifted_loss(logp, batch.behavior_logp, batch.completion_mask,
                               rewards.flatten().masked_fill(batch.truncated, 0).view_as(rewards), 0.1, 1.0)

    assert_same_loss_and_gradient((result.loss, gradient), loss_and_gradient(before, result, masked))
    assert_other_loss_and_gradient((result.loss, gradient), loss_and_gradient(before, result, zeroed))
    policy_logp = result.policy_logp.clone().requires_grad_(True)
    cfg = op.parse_config(["--loss", "shifted", "--truncated", "mask"])
    op.compute_loss(cfg, policy_logp, batch, rewards)[0].backward()
    assert torch.all(policy_logp.grad[batch.truncated] == 0)
    assert torch.all(policy_logp.grad[~batch.truncated][batch.completion_mask[~batch.truncated]] != 0)


def test_apo_is_anchored_on_the_reference_which_no_refresh_ever_touches(tiny, monkeypatch):
    flags = ["--loss", "apo", "--lag", "2", "--lr", "1e-2", "--truncated", "mask"]  # mask: cut ones keep a reward
    models, start, steps, cfg = wiring_run(tiny, flags, monkeypatch, steps=4)
    assert [result.rollout.staleness for _, result, _ in steps] == [1, 0, 1, 0]  # two generator refreshes
    reference_value = op.reference_values(op.frozen_copy(start), tiny[1], WIRING_BATCH, {}, cfg, even_length_checker)
    assert reference_value.unique().numel() > 1
    for step, (before, result, gradient) in enumerate(steps, start=1):
        reference_logp, _ = op.completion_logprobs(start, result.rollout, 1.0)
        mask = result.rollout.completion_mask
        assert (result.ref_logp - reference_logp)[mask].abs().max() < 1e-5  # pi_ref: the policy as RL started
        assert torch.equal(result.ref_value, reference_value)                # and V_ref: from its samples
        assert (result.ref_logp - result.rollout.behavior_logp)[mask].abs().max() > 1e-3  # not mu
        if step > 1:
            assert (result.ref_logp - result.policy_logp)[mask].abs().max() > 1e-3  # not the current policy

        def anchored(logp, batch, rewards):  # --truncated mask: the cut completions are out of the mask
            kept = batch.completion_mask & ~batch.truncated[:, None]
            return op.apo_loss(logp, reference_logp, kept, rewards, reference_value, beta=0.1)

        assert_same_loss_and_gradient((result.loss, gradient), loss_and_gradient(before, result, anchored))
    for kept, initial in zip(models.reference.parameters(), start.parameters()):
        assert torch.equal(kept, initial)
    assert any(not torch.equal(p, q) for p, q in zip(models.generator.parameters(), start.parameters()))


def test_apo_value_comes_from_the_reference_samples_once_per_prompt_wherever_it_is_first_seen(tiny, monkeypatch):
    model, tokenizer = tiny
    cfg = op.parse_config([*CPU, "--loss", "apo", "--group-size", "8", "--beta-value", "0.3", "--max-new-tokens", "30"])
    reference = op.frozen_copy(model)
    sampled = []  # (model, prompts, rollout) of every sample_groups call

    def recording_sample_groups(sampler, tokenizer, prompts, *args, **kwargs):
        rollout = sample_groups(sampler, tokenizer, prompts, *args, **kwargs)
        sampled.append((sampler, prompts, rollout))
        return rollout

    sample_groups = op.sample_groups
    monkeypatch.setattr(op, "sample_groups", recording_sample_groups)
    all_at_once = op.reference_values(reference, tokenizer, WIRING_BATCH, {}, cfg, even_length_checker)
    (sampler, prompts, rollout), = sampled
    assert sampler is reference and prompts == [p for p, _ in WIRING_BATCH]
    rewards = [0.0 if cut else even_length_checker(text, "")  # --truncated zero: a cut completion scores 0
               for text, cut in zip(op.completion_texts(tokenizer, rollout), rollout.truncated)]
    for prompt, value in enumerate(all_at_once.flatten().tolist()):
        group = rewards[8 * prompt: 8 * prompt + 8]
        assert 0 < sum(group) < 8
        assert value == pytest.approx(0.3 * math.log(sum(math.exp(r / 0.3) for r in group) / 8), rel=1e-6)
    cache = {}
    one_by_one = [op.reference_values(reference, tokenizer, [problem], cache, cfg, even_length_checker)
                  for problem in WIRING_BATCH[::-1]]
    assert torch.equal(torch.cat(one_by_one[::-1]), all_at_once)  # the same draws, whatever came first
    sampled.clear()
    with torch.no_grad():
        next(reference.parameters()).add_(1.0)  # a cached value is never sampled again
    assert torch.equal(op.reference_values(reference, tokenizer, WIRING_BATCH[1:], cache, cfg, even_length_checker),
                       all_at_once[1:])
    assert sampled == []


def rollout_of_texts(tokenizer, prompts, texts, truncated=()):
    """A Rollout whose completions are the given texts (rows prompt-major, len(texts) // len(prompts) per prompt)."""
    repeats = len(texts) // len(prompts)
    prompt_ids, prompt_mask = op.left_pad(op.encode_prompts(tokenizer, prompts), tokenizer.pad_token_id)
    completions = [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions])
    completion_mask = op.mask_from_lengths(torch.tensor([len(c) for c in completions]), width)
    return op.Rollout(prompt_ids.repeat_interleave(repeats, 0), prompt_mask.repeat_interleave(repeats, 0),
                      completion_ids, completion_mask, torch.zeros(completion_ids.shape),
                      torch.tensor([row in truncated for row in range(len(texts))]))


def test_score_gives_each_completion_the_reward_of_its_own_prompt(tiny):
    tokenizer = tiny[1]
    prompts, answers = ["7+3=", "45+21=", "99+29="], ["10", "66", "128"]
    texts = ["10", "66",  # prompt 0 (answer 10): right, then prompt 1's answer
             "#### 66", "10",  # prompt 1 (answer 66): right, then prompt 0's answer
             "128", "66"]  # prompt 2 (answer 128): right (cut at the token limit), then prompt 1's answer
    rollout = rollout_of_texts(tokenizer, prompts, texts, truncated={4})
    assert op.score(tokenizer, rollout, answers, 2).tolist() == [[1, 0], [1, 0], [1, 0]]
    assert op.score(tokenizer, rollout, answers, 2, zero_truncated=True).tolist() == [[1, 0], [1, 0], [0, 0]]


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding the plain way: one prompt, the whole sequence through the model at every token."""
    ids, new = op.encode_prompts(tokenizer, [prompt])[0], []
    with torch.no_grad():
        while len(new) < max_new_tokens and tokenizer.eos_token_id not in new:
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    return tokenizer.decode(new, skip_special_tokens=True)


def test_evaluate_is_the_share_of_problems_whose_greedy_answer_is_right(weak_warm_out):
    (folder,) = [d for d in os.listdir(weak_warm_out) if d.startswith("warmstart_")]
    model, tokenizer = op.load_pretrained(str(weak_warm_out / folder))
    model.eval()
    said = {prompt: greedy_text(model, tokenizer, prompt, 6) for prompt, _ in op.arithmetic_problems(40)[1]}
    numbers = [(prompt, text) for prompt, text in said.items() if text.isdigit()][:10]
    assert len(numbers) == 10 and len({text for _, text in numbers}) > 3  # the answers differ from prompt to prompt
    # the reference is what the model says for problems 0, 3, 6 and 9, one more than that for the others
    problems = [(prompt, text if i % 3 == 0 else str(int(text) + 1)) for i, (prompt, text) in enumerate(numbers)]
    assert op.evaluate(model, tokenizer, problems, 6, batch_size=4) == pytest.approx(4 / 10)  # batches 4, 4, 2
    assert op.evaluate(model, tokenizer, problems[1:], 6, batch_size=4) == pytest.approx(3 / 9)


# ---------------------------------------------------------------------------------------------
# The script end to end (in-process through main(), and once as a real subprocess)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm_out(tmp_path_factory):
    """An --out folder holding a cached (short) warm start, shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("warm")
    assert main(["--out", str(out), "--steps", "1", "--eval-size", "8", "--warm-start-steps", "30",
                 "--prompts-per-step", "2", "--group-size", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def weak_warm_out(tmp_path_factory):
    """An --out folder with a cached 120-step warm start (about 7% accuracy: some answers right, most wrong)."""
    out = tmp_path_factory.mktemp("weak_warm")
    op.load_model(op.parse_config(["--out", str(out), "--warm-start-steps", "120"]), op.arithmetic_problems(40)[0],
                  torch.device("cpu"))
    return out


def fresh_out(warm_out, tmp_path, name="out"):
    out = tmp_path / name
    out.mkdir()
    for entry in os.listdir(warm_out):
        if entry.startswith("warmstart_"):
            shutil.copytree(warm_out / entry, out / entry)
    return out


def metrics_of(out):
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    return op.read_lines(os.path.join(out, run, "metrics.jsonl"))


TIMINGS = {"step_seconds", "tokens_per_s", "peak_rss_gb"}


def comparable_metrics(out, ignored=TIMINGS):
    """The run's metrics lines without the fields that differ from run to run (timings)."""
    return [{k: v for k, v in m.items() if k not in ignored} for m in metrics_of(out)]


@pytest.mark.parametrize("loss", op.LOSSES)
def test_every_loss_runs_end_to_end(loss, warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--loss", loss, "--out", str(out), *TINY]) == 0
    assert f"{loss}, lag 16: 3 steps in " in capsys.readouterr().out
    metrics = metrics_of(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval_accuracy" in metrics[0] and "eval_accuracy" in metrics[-1]
    for key in ("loss", "reward_mean", "advantage_mean", "grad_norm", "entropy", "kl_generator_policy",
                "mass_leakage", "staleness", "tokens_per_s"):
        assert all(math.isfinite(m[key]) for m in metrics[1:]), key
    if loss in ("ppo", "tis"):
        assert "clip_fraction" in metrics[1] and "ratio_max" in metrics[1]
    if loss in ("oapl", "pmd", "shifted"):  # apo's anchor is pi_ref: no regime of eq. 2 on mu's samples
        fractions = [metrics[1][k] for k in ("regime_positive", "regime_boundary", "regime_negative")]
        assert sum(fractions) == pytest.approx(1.0)
    if loss == "shifted":
        assert all(m["regime_positive"] == 1.0 for m in metrics[1:])


def test_generator_is_refreshed_every_lag_steps(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), "--lag", "3", "--lr", "1e-2", *TINY, "--steps", "7"]) == 0
    steps = metrics_of(out)[1:]
    assert [m["staleness"] for m in steps] == [0, 1, 2, 0, 1, 2, 0]
    for m in steps:
        assert m["log_ratio_abs_mean"] >= abs(m["log_ratio_mean"])
        if m["staleness"] == 0:  # just refreshed: the policy is the generator
            assert m["log_ratio_abs_mean"] < 1e-5 and m["kl_generator_policy"] < 1e-6
        else:
            assert abs(m["log_ratio_mean"]) > 1e-4
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    with open(out / run / "summary.json") as f:  # fp32: the floor that rounding sets is that of float round-off
        assert json.load(f)["log_ratio_floor"] == pytest.approx(
            sum(m["log_ratio_abs_mean"] for m in steps if m["staleness"] == 0) / 3, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("loss", ["shifted", "apo"])
def test_resume_after_an_interruption_gives_the_same_metrics(loss, warm_out, tmp_path, monkeypatch):
    monkeypatch.setitem(op.CHECKERS, "arith", even_length_checker)  # mixed rewards: A*-PO's V_ref is not all 0
    args = [*TINY, "--lag", "2", "--lr", "1e-3", "--loss", loss]  # evaluates and checkpoints every 3 steps
    straight = fresh_out(warm_out, tmp_path, "straight")
    assert main(["--out", str(straight), *args, "--steps", "6"]) == 0
    interrupted = fresh_out(warm_out, tmp_path, "interrupted")
    assert main(["--out", str(interrupted), *args, "--steps", "3"]) == 0  # stops mid-cycle
    (run,) = [d for d in os.listdir(interrupted) if not d.startswith("warmstart_")]
    metrics_path = interrupted / run / "metrics.jsonl"
    with open(metrics_path, "a") as f:  # a step written after the checkpoint, as if killed mid-run
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    assert main(["--out", str(interrupted), *args, "--steps", "6", "--resume"]) == 0
    assert comparable_metrics(interrupted) == comparable_metrics(straight)
    saved = [torch.load(out / run / "checkpoint.pt", weights_only=True) for out in (straight, interrupted)]
    assert saved[0]["step"] == saved[1]["step"] == 6
    assert saved[1]["ref_values"] == saved[0]["ref_values"]  # A*-PO's V_ref cache, steps 1-3 included
    if loss == "apo":
        assert len(saved[0]["ref_values"]) > 12 and len(set(saved[0]["ref_values"].values())) > 1


def test_model_flag_loads_a_saved_model_and_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    saved = tmp_path / "saved-model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    out = tmp_path / "out"
    assert main(["--model", str(saved), "--out", str(out), *TINY, "--warm-start-steps", "0"]) == 0
    (run,) = os.listdir(out)
    with open(out / run / "config.json") as f:
        assert json.load(f)["model_source"] == str(saved)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY, "--steps", "5", "--lr", "1e30", "--grad-clip", "1e30"]) == 1
    message = capsys.readouterr().err
    assert "at step" in message and "last good checkpoint" in message
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    assert torch.load(out / run / "checkpoint.pt", weights_only=False)["step"] == 0


def test_a_model_whose_weights_hold_nan_stops_with_one_line_before_any_work(tiny, tmp_path, capsys):
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    saved = tmp_path / "nan-model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    out = tmp_path / "out"
    assert main(["--model", str(saved), "--out", str(out), *TINY, "--warm-start-steps", "0"]) == 2
    (err,) = messages(capsys.readouterr().err)
    assert err == (f"error: --model {saved}: 1 weight tensors hold NaN or inf (first: "
                   f"model.layers.1.mlp.up_proj.weight); the model cannot be sampled from")
    assert not out.exists()  # nothing was written


BAD_INPUT = [
    (["--lag", "0"], "--lag must be at least 1"),
    (["--group-size", "-3"], "--group-size must be at least 2"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    (["--beta", "0"], "--beta must be positive"),
    (["--model", "./no-such-model"], "no such directory"),
    (["--resume"], "no checkpoint"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_stops_before_any_work_with_one_line(argv, message, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing was built or written


def messages(stderr: str) -> list[str]:
    """stderr's lines but the progress bars (tqdm's and transformers', drawn as `NN%|`)."""
    return [line for line in stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]


def test_unknown_loss_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--loss", "dpo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    assert op.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_device_cpu_keeps_a_run_off_a_gpu_that_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("a CPU run picked a GPU"))
    assert op.device_and_precision(op.parse_config([])) == (torch.device("cuda"), "bf16")  # auto: the GPU
    assert op.device_and_precision(op.parse_config(CPU)) == (torch.device("cpu"), "fp32")


def test_an_existing_run_is_never_overwritten(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY]) == 0
    files = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.rglob("*") if path.is_file()}
    assert main(["--out", str(out), *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in out.rglob("*") if path.is_file()} == files


def test_the_script_runs_as_a_command_and_fails_cleanly(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    script = os.path.join(HERE, "offpolicy_pessimism.py")
    done = subprocess.run([sys.executable, script, *CPU, "--out", str(out), *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "shifted, lag 16: 3 steps in " in done.stdout and "greedy accuracy" in done.stdout
    bad = subprocess.run([sys.executable, script, "--out", str(out), "--lag", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--lag must be at least 1" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The comparison grid
# ---------------------------------------------------------------------------------------------
GRID = ["--losses", "ppo,shifted", "--lags", "1,2", "--seeds", "1", *TINY]


def test_grid_runs_every_cell_and_resumes_without_rerunning_finished_ones(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert grid_main(["--out", str(out), *GRID]) == 0
    assert "| ppo | 2 |" in capsys.readouterr().out
    cells = sorted(d for d in os.listdir(out) if "_lag" in d)
    assert len(cells) == 4 and (out / "compare.md").exists() and (out / "compare.csv").exists()
    stamps = {c: os.stat(out / c / "metrics.jsonl").st_mtime_ns for c in cells}
    shutil.rmtree(out / cells[0])                           # a cell the grid never reached
    os.remove(out / cells[1] / "summary.json")              # a cell stopped after its last checkpoint
    before = (out / cells[1] / "metrics.jsonl").read_text()
    assert grid_main(["--out", str(out), *GRID]) == 0
    assert (out / cells[0] / "summary.json").exists() and (out / cells[1] / "summary.json").exists()
    assert (out / cells[1] / "metrics.jsonl").read_text() == before  # resumed, not rerun
    for cell in cells[2:]:
        assert os.stat(out / cell / "metrics.jsonl").st_mtime_ns == stamps[cell]  # finished: untouched


def test_grid_table_numbers_equal_the_cells_own_metrics(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert grid_main(["--out", str(out), *GRID, "--seeds", "1,2"]) == 0
    cfg = op.parse_config(["--out", str(out), *GRID, "--seeds", "1,2"], compare.GridConfig)
    with open(out / "compare.csv") as f:
        header, *lines = [line.strip().split(",") for line in f]
    table = {(row[0], int(row[1])): {"loss": row[0], **dict(zip(header[1:], map(float, row[1:])))} for row in lines}
    assert len(table) == 4

    def over_seeds(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def per_step(run, key, last=None):  # the mean over a cell's (last) RL steps, NaN when its loss lacks the key
        values = [m[key] for m in run if "loss" in m and key in m][-last if last else None:]
        return sum(values) / len(values) if values else math.nan

    for (label, lag), row in table.items():
        cells = [c for c in compare.grid_cells(cfg) if compare.cell_label(c) == label and c.lag == lag]
        runs = [op.read_lines(os.path.join(op.run_folder(c), "metrics.jsonl")) for c in cells]
        summaries = [json.load(open(os.path.join(op.run_folder(c), "summary.json"))) for c in cells]
        evals = [[m["eval_accuracy"] for m in run if "eval_accuracy" in m] for run in runs]
        finals = [e[-1] for e in evals]
        expected = {
            "lag": lag, "seeds": 2, "final_accuracy": sum(finals) / 2,
            "final_accuracy_std": math.sqrt(sum((a - sum(finals) / 2) ** 2 for a in finals) / 2),
            "best_accuracy": sum(max(e) for e in evals) / 2, "warm_start_accuracy": sum(e[0] for e in evals) / 2,
            "final_entropy": over_seeds([per_step(run, "entropy", last=10) for run in runs]),
            **{key: over_seeds([per_step(run, key) for run in runs]) for key in
               ("regime_positive", "regime_boundary", "regime_negative", "clip_fraction", "mass_leakage",
                "advantage_mean")},
            "ratio_max": max((m["ratio_max"] for run in runs for m in run if "ratio_max" in m), default=math.nan),
            "minutes": sum(s["minutes"] for s in summaries) / 2,
        }
        assert set(row) == set(expected) | {"loss"}, "a column is not checked"
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-9, nan_ok=True), (label, lag, key)
        assert math.isnan(row["clip_fraction"]) == (label != "ppo") and math.isnan(row["regime_positive"]) == (
            label == "ppo")


def one_thread(function, *args):
    """function(*args) in this process with one thread, as each job of a --jobs grid runs under OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def without_minutes(text: str) -> str:
    """compare.md but its first table's last column (minutes: wall-clock time, not a result)."""
    table, rest = text.split("\n\n", 1) if "\n\n" in text else (text, "")
    return "\n".join(line.rsplit("|", 2)[0] for line in table.splitlines()) + "\n\n" + rest


def test_a_grid_on_two_jobs_writes_the_one_job_tables(warm_out, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each job takes one thread, as the one-job grid below
    grid = ["--losses", "ppo,shifted", "--lags", "2", "--seeds", "1,2", *TINY]
    one, two = fresh_out(warm_out, tmp_path, "one"), fresh_out(warm_out, tmp_path, "two")
    assert one_thread(grid_main, ["--out", str(one), *grid]) == 0
    capsys.readouterr()
    monkeypatch.setattr(compare, "train", lambda *args, **kwargs: pytest.fail("a cell ran in the grid's own process"))
    assert grid_main(["--out", str(two), *grid, "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("| shifted shift=1 | 2 |") == 1  # the table, printed once
    compare_md = [(out / "compare.md").read_text() for out in (one, two)]
    assert "| ppo | 2 | " in compare_md[1] and compare_md[1].count("(2) |") == 2  # two rows, each over 2 seeds
    assert without_minutes(compare_md[1]) == without_minutes(compare_md[0])
    assert (two / "evaluations.md").read_text() == (one / "evaluations.md").read_text()
    cells = sorted(d for d in os.listdir(two) if "_lag" in d)
    assert len(cells) == 4 and cells == sorted(d for d in os.listdir(one) if "_lag" in d)
    for cell in cells:
        lines = [[{k: v for k, v in m.items() if k not in TIMINGS} for m in op.read_lines(out / cell / "metrics.jsonl")]
                 for out in (one, two)]
        assert lines[1] == lines[0]  # each cell's run is the same run in a job of its own
        with open(two / cell / "config.json") as f:
            assert json.load(f)["device_name"] == "CPU (1 threads)"  # OMP_NUM_THREADS reached the job


def test_grid_mean_term_table_is_the_cells_second_half_of_each_stale_cycle(tmp_path):
    cell = {"step": 0, "eval_accuracy": 0.5}
    lines = [cell] + [{"step": s, "loss": 0.1, "staleness": (s - 1) % 4, "mean_term_target": -0.1 * s,
                       "log_ratio_mean": -0.01 * s, "kl_sequence": 0.02 * s, "loss_mean_term": 0.001 * s,
                       "loss_centred": 0.1} for s in range(1, 9)]
    (row,) = compare.mean_term_table({("shifted shift=1", 4): [(lines, {}), (lines, {})]})
    late = [m for m in lines[1:] if m["staleness"] >= 2]  # steps 3, 4, 7, 8
    assert row["target"] == pytest.approx(sum(0.1 * m["step"] for m in late) / 4)
    assert row["achieved"] == pytest.approx(sum(0.01 * m["step"] for m in late) / 4)
    assert row["kl_sequence"] == pytest.approx(sum(0.02 * m["step"] for m in late) / 4)
    assert compare.mean_term_table({("ppo", 4): [([cell, {"step": 1, "loss": 0.1, "staleness": 0}], {})]}) == []
    assert "| shifted shift=1 | 4 | 0.55 | 0.06 | 0.11 |" in compare.format_mean_term_table([row])


def test_grid_evaluations_table_is_the_accuracy_at_each_evaluation_over_seeds():
    def run(accuracies, kl):
        lines = [{"step": 0, "eval_accuracy": accuracies[0]}]
        for step in range(1, 5):
            lines.append({"step": step, "loss": 0.1, "staleness": (step - 1) % 2, "kl_sequence": kl * step,
                          "advantage_mean": 0.1, **({"eval_accuracy": accuracies[step // 2]} if step % 2 == 0 else {})})
        return lines, {}

    (row,) = compare.evaluations_table({("shifted shift=1", 2): [run([0.1, 0.2, 0.4], 0.01), run([0.3, 0.4, 0.6], 0.03)]})
    assert row["accuracy"] == {0: (pytest.approx(0.2), pytest.approx(0.1)), 2: (pytest.approx(0.3), pytest.approx(0.1)),
                               4: (pytest.approx(0.5), pytest.approx(0.1))}
    assert row["kl_before_refresh"] == pytest.approx((0.01 * 3 + 0.03 * 3) / 2)  # steps 2 and 4: staleness 1
    assert row["advantage_mean"] == pytest.approx(0.1)
    table = compare.format_evaluations_table([row]).splitlines()
    assert table[0].startswith("| loss | lag | seeds | step 0 | step 2 | step 4 |")
    assert table[2] == "| shifted shift=1 | 2 | 2 | 0.200 ± 0.100 | 0.300 ± 0.100 | 0.500 ± 0.100 | 0.060 | +0.100 |"


def test_a_grid_with_several_warm_starts_writes_the_start_sweep_table_and_plot(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert grid_main(["--out", str(out), *GRID, "--losses", "ppo,oapl", "--lags", "2", "--warm-starts", "0,30"]) == 0
    lines = (out / "start_sweep.md").read_text().splitlines()
    assert re.fullmatch(r"\| loss \| lag \| start [0-9.]+ \(0 steps\) \| start [0-9.]+ \(30 steps\) \|", lines[0])
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["ppo", "oapl beta_v=0.2"]
    assert (out / "gain_vs_start.png").exists() == bool(importlib.util.find_spec("matplotlib"))
    assert grid_main(["--out", str(tmp_path / "one"), *GRID]) == 0 and not (tmp_path / "one" / "start_sweep.md").exists()


def test_start_sweep_gain_and_kl_before_refresh_are_the_cells_own_numbers(tmp_path):
    cfg = grid_config(["--out", str(tmp_path), "--losses", "ppo,shifted", "--lags", "3",
                           "--seeds", "1,2", "--warm-starts", "100,200"])
    cells = compare.grid_cells(cfg)
    expected = {}
    for number, cell in enumerate(cells):  # made-up runs: evaluations at steps 0, 3, 6; KL by step
        start, final = 0.1 * (cell.warm_start_steps // 100), 0.05 * number
        kl = {step: 0.01 * number + 0.001 * step for step in range(1, 7)}
        os.makedirs(op.run_folder(cell))
        with open(os.path.join(op.run_folder(cell), "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 0, "eval_accuracy": start}) + "\n")
            for step in range(1, 7):
                line = {"step": step, "loss": 0.0, "staleness": (step - 1) % 3, "kl_sequence": kl[step]}
                f.write(json.dumps({**line, **({"eval_accuracy": 0.9} if step == 3 else {}),
                                    **({"eval_accuracy": final} if step == 6 else {})}) + "\n")
        expected.setdefault((cell.loss, cell.warm_start_steps), []).append((start, final - start, (kl[3] + kl[6]) / 2))
    rows = compare.start_sweep_rows(cells)
    assert len(rows) == 4
    for row in rows:
        seeds = expected[row["loss"].split()[0], row["warm_start_steps"]]
        for index, key in enumerate(("start", "gain", "kl_before_refresh")):
            values = [seed[index] for seed in seeds]
            mean = sum(values) / 2
            assert row[key] == pytest.approx(mean) and row[key + "_std"] == pytest.approx(abs(values[0] - mean))
    table = compare.format_start_sweep(rows).splitlines()
    assert table[0] == "| loss | lag | start 0.10 (100 steps) | start 0.20 (200 steps) |"
    gains = {(loss, steps): [g for _, g, _ in expected[loss, steps]] for loss, steps in expected}
    cell_text = lambda g: f"{sum(g) / 2:+.3f} +- {abs(g[0] - sum(g) / 2):.3f}"  # noqa: E731
    assert table[2] == f"| ppo | 3 | {cell_text(gains['ppo', 100])} | {cell_text(gains['ppo', 200])} |"
    assert table[3] == f"| shifted shift=1 | 3 | {cell_text(gains['shifted', 100])} | {cell_text(gains['shifted', 200])} |"


def test_grid_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    compare.plot_grid({("shifted", 16): [([{"step": 0, "eval_accuracy": 0.5}], {})]}, str(tmp_path))
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_grid_refuses_bad_lists_before_any_work(tmp_path, capsys):
    for argv, message in [(["--losses", "ppo,dpo"], "unknown dpo"), (["--lags", "1,x"], "--lags must be"),
                          (["--lags", "0"], "at least 1"), (["--resume"], "drop --resume")]:
        assert grid_main(["--out", str(tmp_path / "out"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regime_preset_sweeps_value_temperatures_and_shifts():
    cells = compare.grid_cells(grid_config(["--preset", "regimes"]))
    assert {compare.cell_label(c) for c in cells} == {"oapl beta_v=0.05", "oapl beta_v=0.1", "oapl beta_v=0.3",
                                                 "shifted shift=0.25", "shifted shift=1", "shifted shift=3"}
    assert {c.lag for c in cells} == {64} and len({op.run_folder(c) for c in cells}) == len(cells)


def test_grid_can_vary_beta_and_the_warm_start_strength():
    cfg = grid_config(["--losses", "pmd,oapl", "--lags", "4", "--seeds", "1",
                           "--betas", "0.05,0.2", "--warm-starts", "300,1200", "--beta-values", "0.1,0.4"])
    cells = compare.grid_cells(cfg)
    assert len(cells) == 2 * 2 * (1 + 2)
    assert {(c.beta, c.warm_start_steps) for c in cells} == {(0.05, 300), (0.05, 1200), (0.2, 300), (0.2, 1200)}
    assert "oapl beta_v=0.4 beta=0.05 warm=1200" in {compare.cell_label(c) for c in cells}
    assert len({op.run_folder(c) for c in cells}) == len(cells) == len({compare.cell_label(c) for c in cells})


# ---------------------------------------------------------------------------------------------
# Real models and data files: chat templates, JSONL tasks, micro-batches, memory savers
# ---------------------------------------------------------------------------------------------
CHAT_STYLES = {
    "qwen2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>",
                  bos=None, template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                     "{% endif %}"),
    "llama": dict(special=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                  eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>",  # no pad token: pad = EOS
                  template="<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                           "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
}


def save_chat_model(style: str, folder) -> str:
    """A tiny randomly initialised Qwen2- or Llama-style model and a byte-level tokenizer (one token per byte,
    like the real ones without their merges) with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    spec = CHAT_STYLES[style]
    vocab = {tok: i for i, tok in enumerate(spec["special"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(spec["special"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=spec["eos"], pad_token=spec["pad"],
                                        bos_token=spec["bos"])
    tokenizer.chat_template = spec["template"]
    torch.manual_seed(0)
    common = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = (Qwen2ForCausalLM(Qwen2Config(**common)) if style == "qwen2" else LlamaForCausalLM(LlamaConfig(**common)))
    path = os.path.join(folder, f"tiny-{style}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


ADDITION_ROWS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                 for a in range(3) for b in range(4)]


@pytest.mark.parametrize("style", ["qwen2", "llama"])
def test_the_full_loop_runs_on_a_saved_chat_model_and_a_jsonl_task(style, tmp_path):
    saved = save_chat_model(style, tmp_path)
    model, tokenizer = op.load_pretrained(saved)
    ids = op.encode_prompts(tokenizer, ["What is 1 plus 2?"])[0]
    first = CHAT_STYLES[style]["special"][1 if style == "qwen2" else 0]
    assert ids[0] == tokenizer.convert_tokens_to_ids(first)  # the template's first token
    if style == "llama":
        assert ids.count(ids[0]) == 1  # the template's BOS, and no second one from the tokenizer
    assert tokenizer.decode(ids).endswith("\n") and "user" in tokenizer.decode(ids)
    plain = op.load_pretrained(saved, plain_prompts=True)[1]
    assert op.encode_prompts(plain, ["hi"])[0] == plain("hi").input_ids

    data = write_jsonl(tmp_path / "train.jsonl", ADDITION_ROWS)
    out = tmp_path / "out"
    argv = ["--model", saved, "--task", "jsonl", "--data", data, "--out", str(out), "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "5", "--eval-every", "2",
            "--eval-fraction", "0.25", "--micro-batch", "4", "--loss", "ppo"]
    assert main(argv) == 0
    (run,) = os.listdir(out)
    metrics = op.read_lines(out / run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    with open(out / run / "config.json") as f:
        assert json.load(f)["lr"] == 1e-6  # the resolved default for a pretrained model
    for key in ("truncated_fraction", "step_seconds", "tokens_per_s", "peak_rss_gb", "loss"):
        assert all(math.isfinite(m[key]) for m in metrics[1:]), key
    assert all(m["tokens_per_s"] > 0 and m["peak_rss_gb"] > 0 for m in metrics[1:])


@pytest.mark.parametrize("style", ["qwen2", "llama"])
def test_chat_model_behavior_logprobs_equal_the_policy_at_staleness_zero(style, tmp_path):
    model, tokenizer = op.load_pretrained(save_chat_model(style, tmp_path))
    model.eval()
    prompts = ["What is 1 plus 2?", "Hi", "A much longer question about numbers?"]
    rollout = op.sample_groups(model, tokenizer, prompts, 2, 6, 1.0, noise(6, 6))
    policy_logp, _ = op.completion_logprobs(model, rollout, 1.0)
    assert rollout.prompt_mask.sum(-1).unique().numel() == 3  # left padding with three lengths
    assert (policy_logp.detach() - rollout.behavior_logp)[rollout.completion_mask].abs().max() < 1e-5


def perturbed_batch(tiny, rows_per_prompt=4):
    """A rollout from the tiny model and a policy moved away from it, so ratios differ from 1."""
    model, tokenizer = tiny
    prompts = ["7+3=", "45+21=", "99+29="]
    rollout = op.sample_groups(model, tokenizer, prompts, rows_per_prompt, 6, 1.0,
                                noise(3 * rows_per_prompt, 6, 3))
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    return moved(model, seed=5).eval(), rollout, rewards


def gradients_of(policy, rollout, rewards, cfg, micro_batch):
    policy.zero_grad(set_to_none=True)
    ref_logp = rollout.behavior_logp - 0.1 * rollout.completion_mask
    ref_value = torch.tensor([[0.3], [0.2], [0.8]])
    loss, _, logp, _ = op.backward_in_micro_batches(
        policy, rollout, 1.0, micro_batch, lambda lp: op.compute_loss(cfg, lp, rollout, rewards, ref_logp, ref_value))
    return loss.item(), [p.grad.clone() for p in policy.parameters()], logp


@pytest.mark.parametrize("loss", op.LOSSES)
def test_micro_batches_give_the_full_batch_loss_and_gradient(loss, tiny):
    policy, rollout, rewards = perturbed_batch(tiny)
    cfg = op.Config(loss=loss)
    full_loss, full_grads, full_logp = gradients_of(policy, rollout, rewards, cfg, 0)
    # 12 rows: single rows, and uneven slices that cut groups apart; centred couples a group's rows, so whole groups
    for micro_batch in ((4, 8) if loss == "centred" else (1, 5)):
        micro_loss, micro_grads, micro_logp = gradients_of(policy, rollout, rewards, cfg, micro_batch)
        assert micro_loss == pytest.approx(full_loss, abs=1e-6)
        assert torch.allclose(micro_logp, full_logp, atol=1e-5)
        assert sum(g.abs().sum() for g in full_grads) > 0
        for g_full, g_micro in zip(full_grads, micro_grads):
            assert torch.allclose(g_micro, g_full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["ppo", "tis"])
def test_ratio_losses_take_a_batch_whose_every_completion_was_cut_and_masked(loss):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    policy_logp = (-torch.rand(4, 3)).requires_grad_()
    nothing = torch.zeros(4, 3, dtype=torch.bool)  # --truncated mask with every completion cut
    value, stats = {"ppo": op.ppo_loss, "tis": op.tis_loss}[loss](policy_logp, -torch.rand(4, 3), nothing, rewards)
    value.backward()
    assert value.item() == 0 and torch.all(policy_logp.grad == 0)  # no token: no gradient, no crash
    assert all(math.isnan(stats[key]) for key in ("ratio_mean", "ratio_max", "clip_fraction"))


def test_compute_loss_refuses_an_unknown_loss_name(tiny):
    _, rollout, rewards = perturbed_batch(tiny)
    for loss in op.LOSSES:  # every known name has its loss
        assert torch.isfinite(op.compute_loss(op.Config(loss=loss), rollout.behavior_logp, rollout, rewards,
                                              rollout.behavior_logp, torch.zeros(3, 1))[0])
    with pytest.raises(ValueError, match="unknown loss 'dpo'; choose from ppo, tis"):
        op.compute_loss(op.Config(loss="dpo"), rollout.behavior_logp, rollout, rewards)


def test_gradient_checkpointing_gives_the_same_gradient(tiny):
    policy, rollout, rewards = perturbed_batch(tiny)
    cfg = op.Config(loss="shifted")
    _, plain, _ = gradients_of(policy, rollout, rewards, cfg, 0)
    op.enable_gradient_checkpointing(policy)
    assert any(getattr(m, "gradient_checkpointing", False) and m.training for m in policy.modules())
    assert not any(isinstance(m, torch.nn.Dropout) and m.training for m in policy.modules())
    _, checkpointed, _ = gradients_of(policy, rollout, rewards, cfg, 0)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6)


def test_truncated_completions_get_zero_reward_or_no_gradient(tiny):
    model, tokenizer = tiny
    rollout = op.sample_groups(model, tokenizer, ["12+3="], 16, 2, 3.0, noise(16, 2))
    assert 0 < int(rollout.truncated.sum()) < 16
    always_right = lambda completion, answer: 1.0  # noqa: E731
    kept = op.score(tokenizer, rollout, ["15"], 16, always_right)
    zeroed = op.score(tokenizer, rollout, ["15"], 16, always_right, zero_truncated=True)
    assert torch.all(kept == 1) and torch.equal(zeroed[0] == 0, rollout.truncated)
    policy_logp = rollout.behavior_logp.clone().requires_grad_(True)
    op.compute_loss(op.Config(loss="shifted", truncated="mask"), policy_logp, rollout, zeroed)[0].backward()
    assert torch.all(policy_logp.grad[rollout.truncated] == 0)
    assert policy_logp.grad[~rollout.truncated].abs().sum() > 0


def test_bf16_autocast_runs_and_keeps_fp32_log_probs(tiny):
    policy, rollout, _ = perturbed_batch(tiny)
    with op.autocast(torch.device("cpu"), "bf16"):
        logp, _ = op.completion_logprobs(policy, rollout, 1.0)
    fp32_logp, _ = op.completion_logprobs(policy, rollout, 1.0)
    assert logp.dtype == torch.float32 and next(policy.parameters()).dtype == torch.float32
    assert 0 < (logp - fp32_logp).abs().max() < 0.1  # bf16 matmuls: close, not identical


BAD_DATA = {  # name: (file lines, message on stderr, exit code)
    "invalid json line": (['{"question": "1+1?", "answer": "#### 2"}', "{not json", '{"question": "2+2?", "answer": "4"}'],
                          "data.jsonl:2: not valid JSON", 0),
    "missing field": (['{"question": "1+1?", "answer": "#### 2"}', '{"prompt": "x", "answer": "1"}',
                       '{"question": "3+1?", "answer": "4"}'], "data.jsonl:2: no text field 'question'", 0),
    "no usable line": (['{"q": 1}', "[]"], "data.jsonl: no usable line (first problem: ", 2),
    "empty file": ([], "no usable line (the file is empty)", 2),
    "gsm8k without a final number": (['{"question": "q", "answer": "It is large."}'], "no checkable final answer", 2),
}


@pytest.mark.parametrize("name", BAD_DATA)
def test_bad_data_files_give_their_messages(name, tmp_path, capsys):
    lines, message, code = BAD_DATA[name]
    data = write_jsonl(tmp_path / "data.jsonl", lines)
    task = "gsm8k" if "gsm8k" in name else "jsonl"
    if code == 0:  # the bad line is reported and skipped, the others are kept
        assert len(op.read_problems(data, task, "question", "answer")) == len(lines) - 1
        assert message in capsys.readouterr().err
        return
    argv = ["--task", task, "--data", data, "--model", save_chat_model("qwen2", tmp_path), "--out",
            str(tmp_path / "out"), "--eval-data", data]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--task", "gsm8k"], "--task gsm8k needs --data FILE.jsonl"),
    (["--task", "gsm8k", "--data", __file__], "--task gsm8k needs --model"),
    (["--data", "x.jsonl"], "--data and --eval-data are for --task gsm8k, math or jsonl"),
    (["--task", "math", "--data", "/no/such.jsonl", "--model", "org/model"], "/no/such.jsonl: no such file"),
    (["--micro-batch", "-1"], "--micro-batch must be at least 0"),
])
def test_bad_task_flags_stop_before_any_work(argv, message, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_fraction_holds_out_problems_never_trained_on(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ADDITION_ROWS)
    cfg = op.parse_config(["--task", "gsm8k", "--data", data, "--eval-fraction", "0.25"])
    train, held_out = op.load_task(cfg)
    assert len(held_out) == 3 and len(train) == 9 and not set(train) & set(held_out)
    assert cfg.max_new_tokens == 512 and cfg.question_field == "question"
    assert op.parse_config(["--task", "math", "--data", data]).question_field == "problem"


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is not None, reason="math_verify is installed")
def test_math_verify_checker_without_the_package_says_how_to_install_it(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--checker", "math_verify"]) == 2
    assert "pip install math-verify" in capsys.readouterr().err


def test_math_verify_checker_compares_symbolically_when_installed():
    pytest.importorskip("math_verify")
    assert op.math_verify_reward("\\boxed{2\\sqrt{3}}", "\\sqrt{12}") == 1.0  # algebra the built-in checker lacks
    assert op.math_reward("\\boxed{2\\sqrt{3}}", "\\sqrt{12}") == 0.0
    assert op.math_verify_reward("\\boxed{3}", "4") == 0.0
    assert op.math_verify_reward("#### 72", "48/2 = 24 clips in May.\n#### 72") == 1.0


# ---------------------------------------------------------------------------------------------
# Speed: the benchmark, and the fast paths equal the plain computations
# ---------------------------------------------------------------------------------------------
def plain_completion_logprobs(model, rollout, temperature):
    """The straightforward computation: every row's prompt and completion in one pass, a full fp32 log-softmax."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask.long(), position_ids=op.position_ids(mask)).logits
    logp = torch.log_softmax(logits[:, rollout.prompt_ids.shape[1] - 1:-1].float() / temperature, dim=-1)
    token_logp = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1) * rollout.completion_mask
    entropy = -(logp.exp() * logp).sum(-1) * rollout.completion_mask
    return token_logp, entropy


@pytest.mark.parametrize("logits_of", ["completion_logits", "shared_prompt_logits"])  # the plain one, its drop-in
@pytest.mark.parametrize("style", ["builtin", "qwen2"])
def test_chunked_logprobs_of_the_plain_pass_and_its_drop_in_equal_the_full_log_softmax(style, logits_of, tiny,
                                                                                      tmp_path):
    if style == "builtin":
        model, tokenizer = tiny
        prompts = ["7+3=", "45+21=", "99+29="]
    else:
        model, tokenizer = op.load_pretrained(save_chat_model(style, tmp_path))
        prompts = ["What is 1 plus 2?", "Hi", "A much longer question about numbers?"]
    model.eval()
    rollout = op.sample_groups(model, tokenizer, prompts, 4, 6, 2.0, noise(12, 6))
    rollout.prompt_ids = torch.cat([torch.full_like(rollout.prompt_ids[:, :2], tokenizer.pad_token_id),
                                    rollout.prompt_ids], dim=1)  # two columns of padding in every row
    rollout.prompt_mask = torch.cat([torch.zeros_like(rollout.prompt_mask[:, :2]), rollout.prompt_mask], dim=1)
    lengths = torch.tensor([5 - row % 4 for row in range(12)])  # several lengths, and a last column of padding
    rollout.completion_mask = op.mask_from_lengths(lengths, 6)
    rollout.completion_ids = rollout.completion_ids.masked_fill(~rollout.completion_mask, tokenizer.pad_token_id)
    fast_logp, fast_entropy = op.completion_logprobs(model, rollout, 0.7, getattr(op, logits_of), chunk_rows=5)
    plain_logp, plain_entropy = plain_completion_logprobs(model, rollout, 0.7)
    assert torch.allclose(fast_logp, plain_logp, atol=1e-5) and torch.allclose(fast_entropy, plain_entropy, atol=1e-5)
    fast_logp.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain_logp.sum().backward()
    for fast, plain in zip(fast_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)
    model.zero_grad()


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are `logits` (V,) whatever it reads."""

    def __init__(self, logits):
        from transformers import LlamaConfig

        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)
        self.config = LlamaConfig(vocab_size=len(logits), hidden_size=8, num_hidden_layers=1, num_attention_heads=1)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, past_key_values=None,
                **kwargs):
        return dataclasses.make_dataclass("Output", ["logits"])(self.logits.expand(*input_ids.shape, -1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_inverse_cdf_sampling_draws_from_the_distribution(temperature):
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    rollout = op.sample_completions(FixedLogits(probs.log()), [[0]], 1, temperature, eos_id=-1, pad_id=0,
                                    uniforms=noise(4000, 1), repeats=4000)  # one prompt, 4000 one-token draws
    draws = rollout.completion_ids[:, 0]
    counts = torch.bincount(draws, minlength=4).double() / draws.numel()
    expected = (probs.double() ** (1 / temperature)) / (probs.double() ** (1 / temperature)).sum()
    assert counts[3] == 0  # a zero-probability token is never drawn
    assert torch.allclose(counts[:3], expected[:3], atol=0.02)
    assert torch.allclose(rollout.behavior_logp[:, 0].double(), expected.log()[draws], atol=1e-6)  # its own log-prob


@pytest.mark.parametrize("loss", ["shifted", "apo"])
def test_bench_writes_every_field_positive(loss, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(["--bench", "2", "--loss", loss, "--out", str(out), "--prompts-per-step", "4",
                 "--group-size", "4", "--micro-batch", "6"]) == 0
    printed = capsys.readouterr().out
    assert "seconds/step" in printed and "MFU" in printed
    (path,) = [p for p in os.listdir(out) if p.startswith("bench_") and p.endswith(".json")]
    with open(out / path) as f:
        report = json.load(f)
    expected = {"seconds_per_step", "generation_seconds", "update_seconds", "completion_tokens_per_s",
                "generation_tokens_per_s", "peak_rss_gb", "matmul_gflops_measured", "step_useful_gflop",
                "matmul_bound_seconds", "mfu", "parameters", "generated_tokens_per_step", "trained_tokens_per_step"}
    assert expected <= set(report) and report["timed_steps"] == 2
    assert all(report[key] > 0 for key in expected), {key: report[key] for key in expected}
    assert report["generation_seconds"] + report["update_seconds"] == pytest.approx(report["seconds_per_step"])
    assert op.sample_groups.__name__ == "sample_groups" and not hasattr(op.sample_groups, "__wrapped__")  # unwrapped


def test_bench_runs_on_a_saved_model_and_a_data_task(tmp_path, capsys):
    saved = save_chat_model("llama", tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", ADDITION_ROWS)
    assert bench_main(["--bench", "1", "--model", saved, "--task", "jsonl", "--data", data, "--out", str(tmp_path),
                 "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "8"]) == 0
    (path,) = [p for p in os.listdir(tmp_path) if p.startswith("bench_")]
    with open(tmp_path / path) as f:
        report = json.load(f)
    assert report["model"] == saved and report["generated_tokens_per_step"] > 0 and report["mfu"] > 0


# ---------------------------------------------------------------------------------------------
# Memory: micro-batches sized to a budget (experiments/bench.py --activation-budget), bf16 copies
# ---------------------------------------------------------------------------------------------
def saved_activation_bytes(model, rollout) -> int:
    """What a forward pass keeps for backward (parameters excluded), counted the test's own way."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        op.completion_logprobs(model, rollout, 1.0)  # as the update computes them
    return sum(storages.values())


def test_measuring_the_activations_leaves_the_model_free_to_be_collected():
    """A grid runs its cells one after another in one process; the probe once kept every cell's
    parameters and gradients alive (1 GB a cell for a 135M model), so the process ran out of memory."""
    model, _ = op.builtin_model()
    bench.activation_bytes_per_token(model, "fp32", op.completion_logits)
    parameter = weakref.ref(next(model.parameters()))
    del model
    gc.collect()
    assert parameter() is None


def test_the_micro_batch_the_bench_suggests_keeps_its_activations_within_the_budget(tiny):
    policy, rollout, _ = perturbed_batch(tiny)  # 12 rows, groups of 4
    per_token = bench.activation_bytes_per_token(policy, "fp32", op.completion_logits)
    group = saved_activation_bytes(policy, rollout.rows(slice(0, 4)))
    prompt_width, completion_width = int(rollout.prompt_mask.any(0).sum()), int(rollout.completion_mask.sum(-1).max())
    assert per_token > 0
    # the estimate counts a prompt token as a completion token (it keeps less: no logits), so it errs on the safe side
    for budget, expected in [(2.5 * group, 4), (0.6 * group, None), (100 * group, 12)]:
        rows = bench.largest_micro_batch(prompt_width, completion_width, 4, 12, per_token, budget)
        if expected is not None:
            assert rows >= expected
        assert rows % 4 == 0 or rows < 4  # whole groups, or rows of one group when a group does not fit
        for part in op.micro_batches(rollout.completion_ids.shape[0], rows):
            assert saved_activation_bytes(policy, rollout.rows(part)) <= budget, (budget, rows)


def test_bench_prints_the_micro_batch_that_fits_its_activation_budget(tmp_path, capsys):
    assert bench_main(["--bench", "1", "--out", str(tmp_path), "--prompts-per-step", "4", "--group-size", "4",
                       "--activation-budget", "1"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("activations kept")]
    assert "--micro-batch 16 fits the budget (whole groups)" in line  # 1 GB holds the tiny model's whole batch


def test_the_learning_rate_default_depends_on_the_model(tmp_path):
    assert op.parse_config([]).lr == 1e-4
    saved = save_chat_model("llama", tmp_path)
    assert op.parse_config(["--model", saved]).lr == 1e-6  # TRL GRPOTrainer's: 1e-4 wrecks a pretrained model
    assert op.parse_config(["--model", saved, "--lr", "3e-5"]).lr == 3e-5


def test_bf16_keeps_the_generator_and_reference_in_bf16_and_the_policy_in_fp32(tiny):
    policy = op.build_tiny_model(tiny[1], seed=1)
    models = op.prepare_models(op.Config(loss="apo"), policy, tiny[1], torch.device("cpu"), "bf16")
    assert next(models.policy.parameters()).dtype == torch.float32
    assert next(models.generator.parameters()).dtype == torch.bfloat16
    assert next(models.reference.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        next(policy.parameters()).add_(0.5)
    op.refresh_generator(models.generator, policy)
    for g, p in zip(models.generator.parameters(), policy.parameters()):
        assert torch.equal(g, p.to(torch.bfloat16))


def test_out_of_gpu_memory_is_one_line_naming_the_flag_to_lower(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(op, "rl_step", out_of_memory)
    assert main(["--out", str(tmp_path / "out"), *TINY]) == 1
    (err,) = messages(capsys.readouterr().err)  # nothing but the one line: no traceback above it
    assert err.startswith("error: out of GPU memory") and "--micro-batch" in err and "Tried" not in err


# ---------------------------------------------------------------------------------------------
# Why a ratio-free loss is stable: the split of eq. 1 into a centred part and a mean term
# ---------------------------------------------------------------------------------------------
SPLIT_REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)


def float64_batch():
    """Token log-probs (12, 5) of a policy and a generator, with completions of several lengths."""
    generator = torch.Generator().manual_seed(0)
    policy_logp = (-torch.rand(12, 5, generator=generator, dtype=torch.float64)).requires_grad_(True)
    behavior_logp = -torch.rand(12, 5, generator=generator, dtype=torch.float64)
    mask = op.mask_from_lengths(torch.tensor([5, 4, 3, 2] * 3), 5)
    return policy_logp, behavior_logp, mask


def test_pmd_shifted_and_oapl_differ_only_by_the_gradient_of_the_mean_term():
    policy_logp, behavior_logp, mask = float64_batch()
    beta = 0.1
    losses = {"pmd": op.pmd_loss(policy_logp, behavior_logp, mask, SPLIT_REWARDS, beta),
              "shifted": op.shifted_loss(policy_logp, behavior_logp, mask, SPLIT_REWARDS, beta, shift=1.0),
              "oapl": op.oapl_loss(policy_logp, behavior_logp, mask, SPLIT_REWARDS, beta, beta_value=0.2)}
    log_ratio = op.sequence_sum(policy_logp - behavior_logp, mask).view_as(SPLIT_REWARDS)
    grads, centred_parts = {}, []
    for name, (loss, diagnostics) in losses.items():
        centred, mean_term = op.regression_split(log_ratio, diagnostics["advantages"], beta)
        assert loss.item() == pytest.approx((centred + mean_term).item(), abs=1e-14)  # the split is exact
        loss_grad, mean_grad, centred_grad = (torch.autograd.grad(value, policy_logp, retain_graph=True)[0]
                                              for value in (loss, mean_term, centred))
        grads[name] = (loss_grad, mean_grad)
        centred_parts.append((centred.item(), centred_grad))
    for value, grad in centred_parts[1:]:  # the centred part is the same function for all three
        assert value == pytest.approx(centred_parts[0][0], abs=1e-14) and torch.allclose(grad, centred_parts[0][1],
                                                                                       atol=1e-14)
    for name in ("shifted", "oapl"):
        loss_difference = grads[name][0] - grads["pmd"][0]
        mean_term_difference = grads[name][1] - grads["pmd"][1]
        assert loss_difference.abs().max() > 1e-3  # the losses do differ
        assert torch.allclose(loss_difference, mean_term_difference, atol=1e-14)


def test_centred_loss_ignores_constants_added_to_a_groups_rewards_or_log_ratios():
    policy_logp, behavior_logp, mask = float64_batch()
    loss, _ = op.centred_loss(policy_logp, behavior_logp, mask, SPLIT_REWARDS, 0.1)
    shifted_rewards = SPLIT_REWARDS + torch.tensor([[0.3], [-2.0], [5.0]], dtype=torch.float64)
    assert op.centred_loss(policy_logp, behavior_logp, mask, shifted_rewards, 0.1)[0].item() == pytest.approx(
        loss.item(), abs=1e-14)
    moved = behavior_logp.clone()
    moved[4:8, 0] += 0.7  # the second group's log-ratios all lower by 0.7: its mean, not its spread
    assert op.centred_loss(policy_logp, moved, mask, SPLIT_REWARDS, 0.1)[0].item() == pytest.approx(loss.item(),
                                                                                                   abs=1e-14)
    log_ratio = op.sequence_sum(policy_logp - behavior_logp, mask).view_as(SPLIT_REWARDS)
    for baseline in (op.group_mean(SPLIT_REWARDS), op.soft_value(SPLIT_REWARDS, 0.2), torch.zeros(3, 1)):
        centred, _ = op.regression_split(log_ratio, SPLIT_REWARDS - baseline, 0.1)  # any group-constant baseline
        assert centred.item() == pytest.approx(loss.item(), abs=1e-14)


def test_mechanism_and_strong_start_presets_have_their_cells():
    cells = compare.grid_cells(grid_config(["--preset", "mechanism"]))
    assert len(cells) == (7 + 2 + 1) * 2 * 3
    labels = {compare.cell_label(c) for c in cells}
    assert {f"shifted shift={s}" for s in ("-2", "-1", "-0.5", "-0.25", "0", "0.25", "1")} <= labels
    assert {"oapl beta_v=0.2", "oapl beta_v=0.3", "centred"} <= labels and len(labels) == 10
    assert {c.lag for c in cells} == {64, 256} and {c.seed for c in cells} == {1, 2, 3}
    assert all(c.steps == 300 for c in cells)
    strong = compare.grid_cells(grid_config(["--preset", "strong-start"]))
    assert len(strong) == 5 * 2 * 3 and {c.lag for c in strong} == {1, 64}
    assert {c.warm_start_steps for c in strong} == {compare.STRONG_WARM_START_STEPS}
    assert {c.loss for c in strong} == {"ppo", "tis", "pmd", "oapl", "shifted"}


def test_start_accuracy_preset_runs_four_losses_from_five_warm_starts_with_one_budget():
    cells = compare.grid_cells(grid_config(["--preset", "start-accuracy"]))
    assert len(cells) == 4 * 2 * 3 * 5
    assert {compare.cell_label(dataclasses.replace(c, warm_starts="")) for c in cells} == \
        {"ppo", "pmd", "oapl beta_v=0.2", "shifted shift=1"}
    assert {c.lag for c in cells} == {1, 64} and {c.seed for c in cells} == {1, 2, 3}
    assert {c.warm_start_steps for c in cells} == {350, 450, 525, 600, 900}
    assert {(c.steps, c.eval_every, c.prompts_per_step, c.group_size) for c in cells} == {(300, 25, 16, 8)}
    assert len({op.run_folder(c) for c in cells}) == len(cells)


def test_real_model_preset_runs_oapl_and_shifted_at_lags_1_and_16_and_pmd_at_16_with_one_budget(tmp_path, capsys):
    cells = compare.grid_cells(grid_config(["--preset", "real-model", "--model", str(tmp_path)]))
    assert sorted((compare.cell_label(c), c.lag) for c in cells) == sorted(
        (label, lag) for label, lag in [("oapl beta_v=0.2", 1), ("oapl beta_v=0.2", 16), ("shifted shift=1", 1),
                                        ("shifted shift=1", 16), ("pmd", 16)] for _ in range(3))
    assert {c.seed for c in cells} == {1, 2, 3} and len({op.run_folder(c) for c in cells}) == 15
    assert {(c.steps, c.eval_every, c.eval_size, c.prompts_per_step, c.group_size, c.max_new_tokens, c.temperature,
             c.lr, c.warm_start_steps) for c in cells} == {(48, 16, 200, 8, 8, 24, 0.6, 1e-5, 0)}
    assert grid_main(["--out", str(tmp_path / "out"), "--preset", "real-model"]) == 2  # no --model
    assert "--preset real-model needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    assert "real-model" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [[], ["--length-normalize", "--truncated", "mask"]])
@pytest.mark.parametrize("loss", ["pmd", "shifted", "oapl", "centred"])
def test_mean_term_diagnostics_are_logged_finite_and_split_the_loss_itself(loss, flags, warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)  # the split is taken on the loss's own log-ratios and mask
    assert main(["--out", str(out), *TINY, "--loss", loss, *flags]) == 0
    steps = metrics_of(out)[1:]
    keys = ["kl_sequence", "equal_reward_groups", "log_ratio_mean"]
    if loss != "centred":
        keys += ["mean_term_target", "loss_centred", "loss_mean_term"]
    for m in steps:
        assert all(math.isfinite(m[key]) for key in keys), m
        assert m["kl_sequence"] >= 0 and 0 <= m["equal_reward_groups"] <= 1
        if loss != "centred":
            assert m["loss_centred"] + m["loss_mean_term"] == pytest.approx(m["loss"], rel=1e-4, abs=1e-6)
    if loss == "shifted":
        assert all(m["mean_term_target"] == pytest.approx(1.0) for m in steps)  # shift * beta / beta


# ---------------------------------------------------------------------------------------------
# The README: its flags table is --help's, its example runs as written, it stands on its own
# ---------------------------------------------------------------------------------------------
def readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_flags_table_has_every_flag_and_every_choice():
    with open(os.path.join(HERE, "docs", "flags.md"), encoding="utf-8") as f:
        rows = {line.split("|")[1].strip(" `"): line for line in f.read().splitlines() if line.startswith("| `--")}
    flags = {"--" + f.name.replace("_", "-"): f for f in dataclasses.fields(op.Config)}
    assert set(rows) == set(flags)  # no flag missing, none that the script no longer has
    for name, f in flags.items():
        for choice in f.metadata.get("choices") or ():
            assert not choice or f"`{choice}`" in rows[name], (name, choice)
    assert all(f"`{preset}`" in readme() for preset in compare.PRESETS if preset)


def test_readme_copy_a_loss_example_runs_as_written():
    example = readme().split("## Copy a loss into your own trainer")[1].split("```python\n")[1].split("```")[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loss, positive = map(float, done.stdout.split())
    assert loss > 0 and positive == 1.0  # the shifted mean puts every group in the pessimistic regime


def test_readme_and_script_point_at_nothing_outside_the_project():
    scripts = []
    for path in ("offpolicy_pessimism.py", "experiments/compare.py", "experiments/bench.py", "examples/trl_grpo.py"):
        with open(os.path.join(HERE, path), encoding="utf-8") as f:
            scripts.append(f.read())
    for text in (readme(), *scripts):
        assert "../shared" not in text and "PAPER.md" not in text




def test_the_trainer_is_one_process_with_no_torch_distributed_processes_or_torchrun():
    for path in ("offpolicy_pessimism.py", "experiments/compare.py", "experiments/bench.py"):
        with open(os.path.join(HERE, path), encoding="utf-8") as f:
            text = f.read()
        for word in ("torch.distributed", "Processes", "torchrun"):
            assert word not in text, (path, word)

# ---------------------------------------------------------------------------------------------
# The code that runs is Part I's: the drop-in only with --fast, and then the same numbers
# ---------------------------------------------------------------------------------------------
def test_the_update_runs_the_plain_forward_unless_fast_swaps_in_the_shared_prompt_drop_in(tiny):
    policy, tokenizer = tiny
    plain = op.prepare_models(op.Config(), copy.deepcopy(policy), tokenizer, torch.device("cpu"), "fp32")
    fast = op.prepare_models(op.Config(fast=True), copy.deepcopy(policy), tokenizer, torch.device("cpu"), "fp32")
    assert plain.logits_of is op.completion_logits and fast.logits_of is op.shared_prompt_logits


def test_a_fast_run_logs_the_plain_runs_metrics(warm_out, tmp_path):
    """With shifted's advantage (r - mean + beta: never 0) the gradient is signal. Where it is 0 up to rounding
    (pmd or apo on equal rewards at pi = mu), AdamW scales that noise to a full step, so two runs part ways."""
    outs = [fresh_out(warm_out, tmp_path, name) for name in ("plain", "fast")]
    assert main(["--out", str(outs[0]), *TINY]) == 0
    assert main(["--out", str(outs[1]), *TINY, "--fast"]) == 0
    plain, fast = (comparable_metrics(out) for out in outs)
    assert [m.keys() for m in plain] == [m.keys() for m in fast]
    for plain_line, fast_line in zip(plain, fast):  # the same tokens drawn, numbers equal up to rounding
        for key, value in plain_line.items():  # (at step 1 pi = mu: the gradient is rounding noise, ~1e-4)
            assert fast_line[key] == pytest.approx(value, rel=1e-3, abs=1e-3), key


def test_a_run_first_says_where_it_runs_and_config_json_keeps_it(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)  # the warm start is cached: nothing is printed before the run
    assert main(["--out", str(out), *TINY]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    parameters = sum(p.numel() for p in op.builtin_model()[0].parameters())
    assert first == (f"running on CPU ({torch.get_num_threads()} threads), fp32, {out}/"
                     f"{[d for d in os.listdir(out) if d.startswith('warmstart_')][0]} "
                     f"({parameters / 1e6:.2f}M parameters), plain update forward")
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    with open(out / run / "config.json") as f:
        config = json.load(f)
    assert config["device_name"] == f"CPU ({torch.get_num_threads()} threads)" and config["parameters"] == parameters


def test_auto_on_the_cpu_of_a_machine_with_an_nvidia_driver_says_torch_cannot_use_it(warm_out, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.setattr(op.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(op, "nvidia_driver_present", lambda: True)
    assert op.main(["--out", str(fresh_out(warm_out, tmp_path)), *TINY]) == 0  # --device auto, and no CUDA
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("running on CPU") and "torch cannot use CUDA" in lines[1]
    assert "torch.cuda.is_available()" in lines[1] and "--device cpu" in lines[1]
    monkeypatch.setattr(op, "nvidia_driver_present", lambda: False)
    assert main(["--out", str(fresh_out(warm_out, tmp_path, "other")), *TINY]) == 0
    assert "torch cannot use CUDA" not in capsys.readouterr().out


def test_a_runs_last_lines_say_what_happened_and_how_to_draw_its_curves(warm_out, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY, "--lag", "2"]) == 0
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    last = capsys.readouterr().out.strip().splitlines()[-5:]
    metrics = metrics_of(out)
    assert last[0] == f"greedy accuracy {metrics[0]['eval_accuracy']:.3f} -> {metrics[-1]['eval_accuracy']:.3f} " \
                      f"(best {max(m['eval_accuracy'] for m in metrics if 'eval_accuracy' in m):.3f})"
    before_refresh = [m["kl_sequence"] for m in metrics[1:] if m["staleness"] == 1 or m["step"] == 3]  # steps 2, 3
    assert last[1].startswith(f"KL(mu || pi) per completion at the end of each of 2 stale cycles: "
                              f"mean {sum(before_refresh) / 2:.3f}")
    assert last[2].startswith(f"mass leakage over the last 10 steps: "
                              f"{sum(m['mass_leakage'] for m in metrics[1:]) / 3:.3f}")
    assert last[3] == f"metrics: {out / run / 'metrics.jsonl'}, samples: {out / run / 'samples.jsonl'}"
    assert last[4] == f"curves: python experiments/curves.py {out / run} (with matplotlib)"
    assert not (out / run / "curves.png").exists()  # the trainer writes numbers only
    assert curves.main([str(out / run)]) == 0
    assert capsys.readouterr().out == f"curves: {out / run / 'curves.png'}\n"
    assert (out / run / "curves.png").stat().st_size > 10_000 and not list((out / run).glob("*.tmp*"))


def test_curves_without_matplotlib_or_of_a_folder_that_is_no_run_say_so_in_one_line(warm_out, tmp_path, monkeypatch,
                                                                                    capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY]) == 0
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    capsys.readouterr()
    assert curves.main([str(tmp_path)]) == 2
    assert messages(capsys.readouterr().err) == [f"error: {tmp_path} holds no metrics.jsonl: give a run folder "
                                                 f"(runs/<loss>_lag...)"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert curves.main([str(out / run)]) == 2
    assert capsys.readouterr().out == "plots skipped: matplotlib is not installed (pip install matplotlib to get them)\n"
    assert not list(out.rglob("curves.png"))


# ---------------------------------------------------------------------------------------------
# What the model writes, and faults in the files a run reads
# ---------------------------------------------------------------------------------------------
def test_every_evaluation_appends_scored_samples_and_prints_one(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY, "--steps", "6"]) == 0  # evaluations at steps 3 and 6
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    samples = op.read_lines(out / run / "samples.jsonl")
    assert [s["step"] for s in samples] == [3] * 4 + [6] * 4
    problems = dict(op.arithmetic_problems(16)[0])
    for sample in samples:
        assert set(sample) == {"step", "prompt", "completion", "reward", "answer"}
        assert sample["answer"] == problems[sample["prompt"]]  # a training prompt with its own answer
        assert sample["reward"] in (0.0, op.reward(sample["completion"], sample["answer"]))  # 0: cut at 6 tokens
    printed = [line for line in capsys.readouterr().out.splitlines() if " sample: " in line]
    assert len(printed) == 2 and printed[0].startswith(f"step 3 sample: {samples[0]['prompt']!r} -> ")


def test_resume_drops_the_samples_written_after_the_checkpoint(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY, "--steps", "3"]) == 0
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    with open(out / run / "samples.jsonl", "a") as f:  # written after the last checkpoint, as if killed
        f.write(json.dumps({"step": 4, "prompt": "1+1=", "completion": "3", "reward": 0.0, "answer": "2"}) + "\n")
    assert main(["--out", str(out), *TINY, "--steps", "6", "--resume"]) == 0
    assert [s["step"] for s in op.read_lines(out / run / "samples.jsonl")] == [3] * 4 + [6] * 4


def files_of(folder) -> dict:
    """Every file's bytes and time stamp."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def test_a_checkpoint_cut_short_stops_the_resume_with_one_line_and_changes_nothing(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY]) == 0
    (checkpoint,) = out.rglob("checkpoint.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = files_of(out)
    capsys.readouterr()
    assert main(["--out", str(out), *TINY, "--steps", "6", "--resume"]) == 2
    (err,) = messages(capsys.readouterr().err)
    assert err.startswith(f"error: --resume: {checkpoint} cannot be read") and "delete" in err
    assert files_of(out) == before


def test_an_out_that_is_a_file_stops_with_one_line(tmp_path, capsys):
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("my notes")
    assert main(["--out", str(not_a_folder), *TINY]) == 2
    (err,) = messages(capsys.readouterr().err)
    assert err == f"error: --out {not_a_folder} is a file, not a folder; give a folder (it is made if missing)"
    assert not_a_folder.read_text() == "my notes"


def test_a_damaged_cached_warm_start_stops_with_one_line_and_is_left_as_it_is(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    (weights,) = out.rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    before = files_of(out)
    assert main(["--out", str(out), *TINY]) == 2
    (err,) = messages(capsys.readouterr().err)
    assert err.startswith(f"error: the cached warm start {weights.parent} cannot be read") and "delete" in err
    assert files_of(out) == before


def test_a_fresh_run_says_where_it_runs_before_it_trains_its_warm_start(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("running on CPU") and "builtin-tiny-llama" in lines[0]
    assert any(line.startswith("warm start: 30 supervised steps") for line in lines[1:])


def test_apo_logs_no_regime_of_eq_2_which_is_anchored_on_mu(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY, "--loss", "apo"]) == 0
    assert not any(key.startswith(("regime_", "p_correct", "loss_centred")) for m in metrics_of(out) for key in m)


def run_dir(out):
    """The one run folder under --out."""
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    return out / run


def test_reading_lines_skips_a_last_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    assert op.read_lines(str(path)) == [{"step": 0}, {"step": 1}]


RESUMED = [*TINY, "--lag", "2", "--lr", "1e-3"]  # evaluates and checkpoints every 3 steps


def test_a_line_cut_by_a_stop_mid_write_is_dropped_on_resume_and_the_run_ends_as_a_straight_one(warm_out, tmp_path):
    straight = fresh_out(warm_out, tmp_path, "straight")
    assert main(["--out", str(straight), *RESUMED, "--steps", "6"]) == 0
    stopped = fresh_out(warm_out, tmp_path, "stopped")
    assert main(["--out", str(stopped), *RESUMED, "--steps", "3"]) == 0
    run = run_dir(stopped)
    with open(run / "metrics.jsonl", "a") as f:  # the machine stopped while step 4's line was being appended
        f.write(json.dumps({"step": 4, "loss": 0.5, "reward_mean": 0.25})[:24])
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"step": 6, "prompt": "1+')
    assert main(["--out", str(stopped), *RESUMED, "--steps", "6", "--resume"]) == 0
    assert comparable_metrics(stopped) == comparable_metrics(straight)
    assert (run / "samples.jsonl").read_text() == (run_dir(straight) / "samples.jsonl").read_text()


class AClassOfItsOwn:
    """Not a tensor nor a plain type: loading it needs this module's code."""


class WritesAFileWhenLoaded:
    """Unpickling this calls Path(marker).touch(): what a checkpoint from elsewhere could do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("payload", ["an object of a class of its own", "a call that writes a file"])
def test_a_checkpoint_that_needs_code_to_load_is_refused_by_resume_with_one_line_and_runs_nothing(
        payload, warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert main(["--out", str(out), *TINY]) == 0
    checkpoint, marker = run_dir(out) / "checkpoint.pt", tmp_path / "it-ran"
    state = torch.load(checkpoint, weights_only=True)  # the run's own checkpoint: plain tensors and types
    state["extra"] = AClassOfItsOwn() if payload.startswith("an object") else WritesAFileWhenLoaded(str(marker))
    torch.save(state, checkpoint)
    before = files_of(out)
    capsys.readouterr()
    assert main(["--out", str(out), *TINY, "--steps", "6", "--resume"]) == 2
    (err,) = messages(capsys.readouterr().err)
    assert err.startswith(f"error: --resume: {checkpoint} cannot be read (UnpicklingError") and "delete" in err
    assert files_of(out) == before and not marker.exists()
    if payload == "a call that writes a file":  # the payload is live: a load that trusts the file runs it
        torch.load(checkpoint, weights_only=False)
        assert marker.exists()


def test_a_warm_start_saved_by_a_second_process_keeps_the_first_copy(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    folder = tmp_path / "warmstart_same"
    assert op.save_model_atomically(model, tokenizer, str(folder)) is True
    first = {path.name: path.read_bytes() for path in folder.iterdir()}
    monkeypatch.setattr(op.os, "getpid", lambda: 424242)  # another process, with other weights
    assert op.save_model_atomically(moved(model, seed=3), tokenizer, str(folder)) is False
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == first
    assert os.listdir(tmp_path) == ["warmstart_same"]  # its temporary copy is gone
