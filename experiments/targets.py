"""The target each eq. 1 loss pulls one group towards, in every regime of eq. 2: the exact solver, a picture, a table.

eq. 2, pi_c(y) = mu(y) W(c exp(A(y)/beta)) / c with c normalising, is eq. 1's minimiser over distributions on a
group's G samples: with the empirical mu (1/G on each sample, the group as the loss sees it), or with the generator's
probabilities of the samples (`--mu`). `induced_target` solves it exactly, on both real branches of Lambert's W.
The trainer solves nothing: it logs the sign of c per group (`regime_shares`), which needs no W.

For one group of G samples with the given rewards, the bars are mu, the Boltzmann target mu exp(A/beta) / Z
(c = 0; the same for every baseline that is constant over the group), and eq. 1's minimiser over the G samples
for pmd (A = r - mean), shifted (A = r - mean + shift * beta) and oapl (A = r - beta_v log mean exp(r/beta_v)).
Each panel is titled with its regime: c > 0 pessimistic, c = 0 boundary, c < 0 negative, or collapsed (one
sample on the lower Lambert-W branch W_-1, hatched). The defaults show all four.

    python experiments/targets.py                      # docs/targets.png and the table
    python experiments/targets.py --rewards 1,0,0,0,0,0,0,0 --beta 0.5 --out /tmp/targets.png

How much a collapsed target holds (`induced_target`, the empirical mu, G = 8). W0 on every sample normalises
while c exp(max A/beta) can stay above -1/e. Past that threshold the target collapses onto the sample with the
largest A, usually with most of the mass: 0.9999 for the one correct answer with A = r - 0.9 (beta 0.1), 0.58 for
equal rewards at their threshold A/beta = -1 (0.87 at -2); over half in 99.9% of random collapsed groups of
rewards 0 and 1 (baselines 0 to 1.5, beta 0.05 to 0.55), the lowest 0.47. Where the largest A is shared (or
nearly), the target can collapse before the threshold, onto less than half: equal rewards keep pi = mu
(c = A/beta) down to A/beta = -0.795, then one sample jumps to 0.395 (0.404 at -0.8; half only below -0.884);
7 of 8 correct with shift -2 (the defaults) gives 0.49. So c < 0 alone is no collapse: equal rewards at
A/beta = -0.5 have pi = mu.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curves import pyplot  # noqa: E402
from offpolicy_pessimism import group_mean, shifted_mean_advantages, soft_value  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Lambert's W on its two real branches (W0: w >= -1, W_-1: w <= -1, roots of w exp(w) = z), in float64.
# ----------------------------------------------------------------------------------------------
def lambert_halley(z: torch.Tensor, w: torch.Tensor, lower_branch: bool, max_iterations: int = 50) -> torch.Tensor:
    """Refines a start w towards w exp(w) = z by Halley's method, keeping w on its branch (W0: w >= -1, W_-1:
    w <= -1). Within 1e-6 of the branch point z = -1/e the start (a series) is already exact to 1e-13 and the
    residual is rounding noise, so w is kept there."""
    near_branch = math.e * z + 1 < 1e-6
    for _ in range(max_iterations):
        ew = torch.exp(w)
        residual = w * ew - z
        step = residual / (ew * (w + 1) - (w + 2) * residual / (2 * w + 2))
        step = torch.where(torch.isfinite(step) & ~near_branch, step, torch.zeros_like(step))
        w = (w - step).clamp(max=-1) if lower_branch else (w - step).clamp(min=-1)
        if not bool((step.abs() > 1e-10 * (1 + w.abs())).any()):  # cubic: this step left an error ~ 1e-30
            break
    return w


def branch_point_series(z: torch.Tensor, lower_branch: bool) -> torch.Tensor:
    """W(z) near z = -1/e: -1 + p - p^2/3 + 11/72 p^3 with p = +-sqrt(2 (e z + 1)), + on W0 and - on W_-1."""
    p = (2 * (math.e * z + 1)).clamp(min=0).sqrt()
    p = -p if lower_branch else p
    return -1 + p - p ** 2 / 3 + 11 / 72 * p ** 3


def lambert_w0(z: torch.Tensor) -> torch.Tensor:
    """Principal branch W0(z) for z >= -1/e: the root w >= -1 of w exp(w) = z, in float64 (-1 below -1/e)."""
    z = z.double().clamp(min=-1 / math.e)
    large = torch.log(z.clamp(min=3)) - torch.log(torch.log(z.clamp(min=3)))  # w = log z - log w, iterated once
    start = torch.where(z < -0.25, branch_point_series(z, False),
                        torch.where(z > 3, large, torch.log1p(z.clamp(min=-0.25))))
    return lambert_halley(z, start, lower_branch=False)


def lambert_wm1(z: torch.Tensor) -> torch.Tensor:
    """Lower branch W_-1(z) for -1/e <= z < 0: the root w <= -1 of w exp(w) = z, in float64.

    Starts from the branch-point series near -1/e, and from log(-z) - log(-log(-z)) as z -> 0- (where
    W_-1 -> -infinity); z is clamped into [-1/e, -tiny]."""
    z = z.double().clamp(min=-1 / math.e, max=-torch.finfo(torch.float64).tiny)
    log_minus_z = torch.log(-z)
    near_zero = log_minus_z - torch.log(-log_minus_z) + torch.log(-log_minus_z) / log_minus_z
    start = torch.where(z < -0.25, branch_point_series(z, True), near_zero)
    return lambert_halley(z, start, lower_branch=True)


def lambert_w_of_exp(sign: torch.Tensor, log_abs_x: torch.Tensor, lower_branch: torch.Tensor) -> torch.Tensor:
    """W(x) for x = sign * exp(log_abs_x), on W_-1 where lower_branch, else W0. All arguments broadcast.

    eq. 2 needs W(c exp(A/beta)), and exp(A/beta) overflows float64 once A/beta > 709 (beta = 1e-3, A = 1).
    Where |x| is large (x > e) or tiny on W_-1 (x > -exp(-2)), take logs of w exp(w) = x instead:
    w + log|w| = log|x|, increasing and concave in w on both branches, so Newton's method converges
    (monotonically after its first step) from w = u - log|u|, u = log|x|."""
    u = log_abs_x
    sign, lower_branch = sign.expand_as(u), lower_branch.expand_as(u)
    by_logs = (sign > 0) & (u > 1) | lower_branch & (sign < 0) & (u < -2)
    on_w0, on_wm1 = ~by_logs & ~lower_branch, ~by_logs & lower_branch
    w = torch.empty_like(u)
    w[on_w0] = lambert_w0(sign[on_w0] * u[on_w0].clamp(max=1).exp())  # the clamp only spares sign = 0 an inf
    w[on_wm1] = lambert_wm1(-u[on_wm1].exp())
    u = u[by_logs]
    w_logs = u - torch.log(u.abs())  # |u| > 1 here, so the start is on the right branch
    for _ in range(50):
        step = (w_logs + torch.log(w_logs.abs()) - u) / (1 + 1 / w_logs)
        w_logs = w_logs - step
        if not bool((step.abs() > 1e-9 * w_logs.abs()).any()):  # quadratic: this step left an error ~ 1e-18
            break
    w[by_logs] = w_logs
    return w


# ----------------------------------------------------------------------------------------------
# eq. 1's minimiser over distributions on a group's G samples, in every regime (eq. 2 on the right branch), and the
# regime shares of a batch of groups from it.
# ----------------------------------------------------------------------------------------------
class InducedTarget(NamedTuple):
    """eq. 1's minimiser per group: pi = mu * ratio, from eq. 2 with the constant c."""
    c: torch.Tensor                # (groups,) float64: > 0 pessimistic, 0 boundary, < 0 negative or collapsed
    ratio: torch.Tensor            # (groups, G) float64: pi / mu
    collapsed: torch.Tensor        # (groups,) bool: one sample is on W_-1 (the target collapses onto it)
    collapsed_index: torch.Tensor  # (groups,) long: that sample, -1 where not collapsed


def bisect(root_is_above, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The point in [lo, hi] (elementwise) where root_is_above(t) flips from True (below it) to False (above it);
    halving the bracket until it is float64 round-off (1e-13 relative, at most 200 halvings)."""
    for _ in range(200):
        if not bool(((hi - lo) > 1e-13 * (1 + lo.abs())).any()):
            break
        mid = (lo + hi) / 2
        above = root_is_above(mid)
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def stationary_point(sign, log_abs_c, scaled, lower_branch):
    """The stationary point of eq. 1 for a given c = sign * exp(log_abs_c), per sample (eq. 2):
    pi/mu = W(c exp(A/beta)) / c = exp(A/beta - W(c exp(A/beta))), since W(x) / x = exp(-W(x)).
    scaled: A/beta, (..., G); sign, log_abs_c: (...); lower_branch: bool, broadcasts to (..., G).
    Returns log(pi/mu) and W, both (..., G)."""
    w = lambert_w_of_exp(sign[..., None], log_abs_c[..., None] + scaled, lower_branch)
    return scaled - w, w


def total_log_mass(sign, log_abs_c, scaled, log_mu, lower_branch):
    """log sum_i pi_i at the stationary point of c = sign * exp(log_abs_c) (shapes as in stationary_point)."""
    log_ratio, _ = stationary_point(sign, log_abs_c, scaled, lower_branch)
    return torch.logsumexp(log_mu + log_ratio, -1)


def collapsed_minima(scaled: torch.Tensor, log_mu: torch.Tensor, candidates: torch.Tensor):
    """c < 0 with W_-1 on one candidate sample k and W0 on the others: eq. 1's minimum on that family, per group and
    candidate. scaled = A/beta, log_mu: (groups, G), all groups with c < 0; candidates: (groups, K) long.

    With t = log|c|: as c -> 0- (t -> -inf) pi_k grows without bound; towards the branch point (c exp(max A/beta)
    = -1/e, where W0 ends) the total mass comes down to a dip, below 1 or not, and can rise again. A minimum of
    eq. 1 needs the mass to rise as c -> 0- where it crosses 1 (the second-order condition; at a crossing on the
    other side of the dip eq. 1 has a saddle), so: find the dip, then the crossing before it, both by bisection.
    Returns eq. 1 / beta^2 (inf where the mass never gets down to 1) and log|c|, both (groups, K), and
    log(pi/mu), (groups, K, G)."""
    size = scaled.shape[-1]
    lower = torch.nn.functional.one_hot(candidates, size).bool()         # (groups, K, G): W_-1 on k in row k
    sign = torch.full_like(scaled[:, :1], -1.0)                           # (groups, 1) c < 0
    scaled, log_mu = scaled[:, None], log_mu[:, None]                     # (groups, 1, G): broadcast over K
    hi = (-1 - scaled.max(-1).values).expand(candidates.shape)            # (groups, K) log|c| at the branch point
    lo = torch.minimum(log_mu[:, 0].gather(1, candidates), hi) - 1  # |c| < mu_k / e, so pi_k >= mu_k / |c| > 1

    def mass_falls_with_t(t):  # d(mass)/dt = -sum_i pi_i W_i / (1 + W_i) < 0, with 1 + W_i kept off 0
        log_ratio, w = stationary_point(sign, t, scaled, lower)
        one_plus_w = torch.where(lower, (1 + w).clamp(max=-1e-300), (1 + w).clamp(min=1e-300))
        log_pi = log_mu + log_ratio
        pi = (log_pi - log_pi.max(-1, keepdim=True).values).exp()        # up to a positive factor: no overflow
        return (pi * w / one_plus_w).sum(-1) > 0

    dip = bisect(mass_falls_with_t, lo, hi)
    crosses = total_log_mass(sign, dip, scaled, log_mu, lower) <= 0
    log_abs_c = bisect(lambda t: total_log_mass(sign, t, scaled, log_mu, lower) > 0, lo, dip)
    log_ratio, w = stationary_point(sign, log_abs_c, scaled, lower)
    loss = torch.where(crosses, (log_mu.exp() * w ** 2).sum(-1), torch.full_like(log_abs_c, math.inf))
    return loss, log_abs_c, log_ratio


def induced_target(advantages: torch.Tensor, beta: float, mu: torch.Tensor | None = None) -> InducedTarget:
    """eq. 1's global minimiser over distributions pi on each group's G samples (eq. 2, on the right branch).

    L(pi) = sum_i mu_i (beta log(pi_i/mu_i) - A_i)^2 with sum_i pi_i = 1. Its stationary points are
    pi_i/mu_i = W(c exp(A_i/beta)) / c, where L = beta^2 sum_i mu_i W_i^2. In u = log(pi/mu), L is the
    (mu-weighted) distance from A/beta to the surface sum_i mu_i exp(u_i) = 1, the edge of a convex set; c has the
    sign of log E_mu exp(A/beta), i.e. of whether A/beta lies outside that set or inside:
    - c > 0 (outside, pessimistic): W0 on every sample; a convex set has one nearest point.
    - c = 0 (|log E_mu exp(A/beta)| < 1e-6, round-off): the Boltzmann target mu exp(A/beta) / Z.
    - c < 0 (inside): the nearest point of the edge can be one of several. W0 on every sample works while that
      family reaches total mass 1, which it cannot once c exp(max A/beta) would pass -1/e. A minimum always exists
      (L blows up as any pi_i -> 0): then one sample sits on the other branch W_-1 and takes a large share of the
      mass, the target collapses onto it. Never two: L would be concave along a direction that keeps sum pi = 1.
    Which sample: with mu uniform, L is symmetric in the samples, so by the rearrangement inequality its minimiser
    orders pi like A, and the sample on W_-1 has the largest pi: it must have the largest A (ties: the lowest
    index, equal-A samples being interchangeable). That is the only candidate tried. It collapses wherever the W0
    family cannot normalise, and where the largest A is shared or nearly (say 7 of 8 correct) it can earlier, onto
    a smaller share (the module's docstring has the numbers). With mu given,
    every sample is a candidate (W_-1 on k, W0 on the others) and the lowest L wins, W0 everywhere included: a rare
    sample (small mu_k) can beat the largest A, even while the W0 family normalises, because moving it costs only
    mu_k (log(pi_k/mu_k) - A_k/beta)^2.

    advantages: (groups, G); mu: (groups, G) generator probabilities, positive, each row summing to 1 (None: the
    empirical mu, uniform). c is solved as log|c|, by bisection, so any A/beta in float64 range works (beta = 1e-3
    included, where exp(A/beta) overflows).
    """
    scaled = advantages.double() / beta                                   # (groups, G) A/beta
    groups, size = scaled.shape
    log_mu = torch.full_like(scaled, -math.log(size)) if mu is None else mu.double().log()
    log_mass_boltzmann = torch.logsumexp(log_mu + scaled, -1)              # (groups,) log E_mu exp(A/beta)
    positive, negative = log_mass_boltzmann > 1e-6, log_mass_boltzmann < -1e-6
    sign = positive.double() - negative.double()                           # (groups,) the sign of c
    largest = scaled.max(-1).values                                         # (groups,)
    branch = -1 - largest  # log|c| where c exp(max A/beta) = -1/e: for c < 0, W0 ends there

    # W0 on every sample. The total mass decreases in c: c > 0 on [0+, max A/beta] (at c = max A/beta every
    # pi_i/mu_i <= 1), c < 0 on [the branch point, 0-]. exp(-60) of either end is as good as its limit.
    on_w0 = torch.zeros_like(scaled, dtype=torch.bool)                    # no sample on W_-1
    lo = torch.where(positive, -largest - 60, branch - 60)
    hi = torch.where(positive, largest.clamp(min=1e-300).log(), branch)
    log_abs_c = bisect(lambda t: (total_log_mass(sign, t, scaled, log_mu, on_w0) > 0) == positive, lo, hi)
    log_ratio, w = stationary_point(sign, log_abs_c, scaled, on_w0)        # (groups, G) both

    # c < 0: the W0 family's minimum (if it normalises) against the collapsed ones; the lowest eq. 1 wins, and
    # within round-off the first of: W0 everywhere, then the candidates in index order.
    collapsed = torch.zeros_like(negative)
    collapsed_index = torch.full_like(scaled[:, 0], -1, dtype=torch.long)
    rows = negative.nonzero()[:, 0]
    if len(rows):
        candidates = (scaled[rows].argmax(-1, keepdim=True) if mu is None  # (rows, K)
                      else torch.arange(size, device=scaled.device).expand(len(rows), size))
        loss_k, log_abs_c_k, log_ratio_k = collapsed_minima(scaled[rows], log_mu[rows], candidates)
        w0_normalises = total_log_mass(sign[rows], branch[rows], scaled[rows], log_mu[rows], on_w0[rows]) >= 0
        w0_loss = torch.where(w0_normalises, (log_mu[rows].exp() * w[rows] ** 2).sum(-1), math.inf)
        losses = torch.cat([w0_loss[:, None], loss_k], 1)                   # (rows, 1 + K)
        best = losses.min(-1, keepdim=True).values
        winner = (losses <= best + 1e-12 * (1 + best)).double().argmax(-1)  # the first within round-off
        pick = (winner - 1).clamp(min=0)                                   # the candidate, if one wins
        on_wm1 = winner > 0
        collapsed[rows] = on_wm1
        collapsed_index[rows] = torch.where(on_wm1, candidates.gather(1, pick[:, None])[:, 0], -1)
        chosen = log_ratio_k[torch.arange(len(rows), device=scaled.device), pick]  # (rows, G)
        log_ratio[rows] = torch.where(on_wm1[:, None], chosen, log_ratio[rows])
        log_abs_c[rows] = torch.where(on_wm1, log_abs_c_k.gather(1, pick[:, None])[:, 0], log_abs_c[rows])

    boundary = ~positive & ~negative
    log_ratio = torch.where(boundary[:, None], scaled - log_mass_boltzmann[:, None], log_ratio)
    c = torch.where(boundary, 0.0, sign * log_abs_c.exp())
    return InducedTarget(c, log_ratio.exp(), collapsed, collapsed_index)


def regime_diagnostics(advantages: torch.Tensor, rewards: torch.Tensor, beta: float) -> dict:
    """The exact counterpart of the trainer's `regime_shares` (which logs only the sign of c, no solve): the share
    of groups per regime of eq. 2 (c > 0, c = 0, c < 0, and among c < 0 those collapsed onto one sample via W_-1),
    the target's largest probability, and P(correct) under mu, the nominal mu exp(A/beta) / Z and the induced
    target, all on the empirical mu (uniform over each group's G samples). advantages, rewards: (groups, G).
    c = 0 here is the solver's (|log mean exp(A/beta)| below 1e-6), not `regime_shares`' round-off tolerance,
    so a group within rounding of the boundary can count as c = 0 in one and not in the other."""
    target = induced_target(advantages, beta)
    induced = target.ratio / advantages.shape[-1]                         # (groups, G) pi = mu * ratio
    nominal = torch.softmax(advantages.double() / beta, dim=-1)
    correct = rewards.double()
    return {
        "regime_positive": (target.c > 0).double().mean().item(),
        "regime_boundary": (target.c == 0).double().mean().item(),
        "regime_negative": (target.c < 0).double().mean().item(),          # collapsed included
        "regime_collapsed": target.collapsed.double().mean().item(),
        "target_max_mass": induced.max(-1).values.mean().item(),
        "lambert_c_mean": target.c.mean().item(),
        "p_correct_generator": correct.mean().item(),
        "p_correct_nominal": (nominal * correct).sum(-1).mean().item(),
        "p_correct_induced": (induced * correct).sum(-1).mean().item(),
    }


# ----------------------------------------------------------------------------------------------
# One group's targets: the flags, the table and the picture.
# ----------------------------------------------------------------------------------------------
def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--{name}: expected comma-separated numbers, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        raise SystemExit(f"--{name}: expected finite numbers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", default="1,1,1,1,1,1,1,0", help="the group's rewards, comma-separated")
    parser.add_argument("--mu", default="", help="generator probabilities of the samples (renormalised); "
                                                 "empty: uniform, the empirical mu")
    parser.add_argument("--beta", type=float, default=0.1, help="regression temperature beta of eq. 1")
    parser.add_argument("--shifts", default="1,-2", help="shifted: A = r - mean + shift * beta, one panel each")
    parser.add_argument("--beta-value", default="0.2,0.05", help="oapl's value temperature beta_v, one panel each")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "targets.png"), help="the PNG written")
    args = parser.parse_args(argv)
    args.rewards = parse_floats(args.rewards, "rewards")
    args.shifts = parse_floats(args.shifts, "shifts")
    args.beta_value = parse_floats(args.beta_value, "beta-value")
    args.mu = parse_floats(args.mu, "mu") if args.mu else [1.0] * len(args.rewards)
    if len(args.mu) != len(args.rewards) or min(args.mu) <= 0:
        raise SystemExit(f"--mu: expected {len(args.rewards)} positive numbers, one per reward")
    if args.beta <= 0 or min(args.beta_value) <= 0:
        raise SystemExit("--beta and --beta-value must be positive")
    return args


def targets(rewards: torch.Tensor, mu: torch.Tensor, beta: float, shifts: list[float],
            beta_values: list[float]) -> list[dict]:
    """One row per panel: name, A (G,), target pi (G,), c, regime, the collapsed sample (-1: none).
    rewards, mu: (G,) float64, mu summing to 1."""
    losses = [("pmd", rewards - group_mean(rewards))]
    losses += [(f"shifted {shift:+g}", shifted_mean_advantages(rewards, beta, shift)) for shift in shifts]
    losses += [(f"oapl beta_v={beta_value:g}", rewards - soft_value(rewards, beta_value)) for beta_value in beta_values]
    boltzmann = torch.softmax(mu.log() + rewards / beta, -1)  # mu exp(A/beta) / Z, any group-constant baseline
    rows = [{"name": "mu (generator)", "advantages": None, "pi": mu, "c": None, "regime": "", "collapsed": -1},
            {"name": "Boltzmann mu exp(A/beta)/Z", "advantages": None, "pi": boltzmann, "c": 0.0,
             "regime": "c = 0 (boundary)", "collapsed": -1}]
    for name, advantages in losses:
        target = induced_target(advantages[None], beta, mu[None])
        c, collapsed = target.c.item(), target.collapsed_index.item()
        regime = ("collapsed" if collapsed >= 0 else "c > 0 (pessimistic)" if c > 0 else
                  "c = 0 (boundary)" if c == 0 else "c < 0 (negative)")
        rows.append({"name": name, "advantages": advantages, "pi": mu * target.ratio[0], "c": c, "regime": regime,
                     "collapsed": collapsed})
    return rows


REGIME_COLOURS = {"c > 0 (pessimistic)": "tab:blue", "c = 0 (boundary)": "black", "c < 0 (negative)": "tab:orange",
                  "collapsed": "tab:purple", "": "black"}


def off_best_mass(pi: torch.Tensor, rewards: torch.Tensor) -> float:
    """The probability on samples whose reward is below the group's best."""
    return pi[rewards < rewards.max()].sum().item()


def print_table(rows: list[dict], rewards: torch.Tensor, beta: float) -> None:
    """Per panel: its regime and c, then A and the target probability of each sample."""
    numbers = lambda values, spec: " ".join(format(v, spec) for v in values.tolist())  # noqa: E731
    print(f"beta = {beta:g}; {len(rewards)} samples with rewards {numbers(rewards, 'g')}")
    print(f"{'':<28} {'regime':<22} {'c':>9}  {'P(below best)':>13}")
    for row in rows:
        c = "" if row["c"] is None else format(row["c"], ".4g")
        regime = row["regime"] + (f" onto {row['collapsed']}" if row["collapsed"] >= 0 else "")
        print(f"{row['name']:<28} {regime:<22} {c:>9}  {off_best_mass(row['pi'], rewards):13.3g}")
        if row["advantages"] is not None:
            print(f"{'    A':<28} {numbers(row['advantages'], '+9.3f')}")
        print(f"{'    pi':<28} {numbers(row['pi'], '9.3g')}")


def draw(rows: list[dict], rewards: torch.Tensor, beta: float, path: str) -> bool:
    """Bars of each panel's target on a log axis, Boltzmann as black ticks, mu as grey dots; False without
    matplotlib."""
    plt = pyplot(say_if_missing=False)
    if plt is None:
        print("picture not drawn: matplotlib is not installed (pip install matplotlib draws it)")
        return False
    size = len(rewards)
    columns = math.ceil(len(rows) / 2)
    figure, axes = plt.subplots(2, columns, figsize=(3.4 * columns, 6.6), sharey=True, squeeze=False)
    best = rewards == rewards.max()
    colours = ["tab:green" if b else "tab:red" for b in best.tolist()]
    floor = 1e-6
    samples = list(range(size))
    boltzmann = rows[1]["pi"]
    for axis, row in zip(axes.flat, rows):
        pi = row["pi"].clamp(min=floor).tolist()
        bars = axis.bar(samples, pi, color=colours, edgecolor="black", linewidth=0.5)
        axis.plot(samples, boltzmann.clamp(min=floor).tolist(), "_", color="black", markersize=14,
                  markeredgewidth=2, label="Boltzmann target (c = 0)")
        axis.plot(samples, rows[0]["pi"].tolist(), "o", color="grey", markersize=3, label="mu")
        if row["collapsed"] >= 0:
            k = row["collapsed"]
            bars[k].set_hatch("///")
            bars[k].set_linewidth(1.5)
            text_at = k + 1.2 if k < size / 2 else k - 4.2  # beside the bar, inside the panel
            axis.annotate("W_-1: collapse", (k, pi[k]), xytext=(text_at, 1.0), fontsize=8, color="tab:purple",
                          arrowprops={"arrowstyle": "->", "lw": 1, "color": "tab:purple"})
        c = "" if row["c"] is None or row is rows[1] else f", c = {row['c']:.3g}"
        below = ""
        if row is not rows[0] and not best.all():
            factor = off_best_mass(row["pi"], rewards) / off_best_mass(boltzmann, rewards)
            below = f"\nbelow the best: {factor:.2f} x Boltzmann"
        axis.set_title(f"{row['name']}\n{row['regime']}{c}{below}", fontsize=9, color=REGIME_COLOURS[row["regime"]])
        axis.set_yscale("log")
        axis.set_ylim(floor, 3)
        axis.set_xticks(samples)
        axis.set_xlabel("sample (green: best reward)", fontsize=8)
    for axis in axes.flat[len(rows):]:
        axis.axis("off")
    legend = [("eq. 1's minimiser:\npi/mu = W(c exp(A/beta)) / c", "black"),
              ("c > 0: pessimistic, flatter than Boltzmann", REGIME_COLOURS["c > 0 (pessimistic)"]),
              ("c = 0: Boltzmann, mu exp(A/beta) / Z", REGIME_COLOURS["c = 0 (boundary)"]),
              ("c < 0: sharper than Boltzmann (W0)", REGIME_COLOURS["c < 0 (negative)"]),
              ("collapsed: one sample on the lower\nbranch W_-1 takes a large share", REGIME_COLOURS["collapsed"])]
    if len(rows) < axes.size:  # the spare panel explains the colours
        for line, (text, colour) in enumerate(legend):
            axes.flat[-1].text(0, 0.85 - 0.13 * line - 0.08 * (line > 0), text, fontsize=9, color=colour,
                               va="top", transform=axes.flat[-1].transAxes)
    for axis in axes[:, 0]:
        axis.set_ylabel("probability (log)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.suptitle(f"eq. 1's target on one group of {size} samples (beta = {beta:g}): pessimistic (c > 0) puts more "
                    "than Boltzmann below the best, negative (c < 0) less, collapsed piles onto one sample",
                    fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)  # written, then renamed: a reader never sees half a PNG
    plt.close(figure)
    os.replace(temporary, path)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rewards = torch.tensor(args.rewards, dtype=torch.float64)
    mu = torch.tensor(args.mu, dtype=torch.float64)
    mu = mu / mu.sum()
    rows = targets(rewards, mu, args.beta, args.shifts, args.beta_value)
    print_table(rows, rewards, args.beta)
    if draw(rows, rewards, args.beta, args.out):
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
