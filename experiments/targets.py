"""The target each eq. 1 loss pulls one group towards, in every regime of eq. 2: a picture and a table.

For one group of G samples with the given rewards, the bars are mu, the Boltzmann target mu exp(A/beta) / Z
(c = 0; the same for every baseline that is constant over the group), and eq. 1's minimiser over the G samples
for pmd (A = r - mean), shifted (A = r - mean + shift * beta) and oapl (A = r - beta_v log mean exp(r/beta_v)).
Each panel is titled with its regime: c > 0 pessimistic, c = 0 boundary, c < 0 negative, or collapsed (one
sample on the lower Lambert-W branch W_-1, hatched). The defaults show all four.

    python experiments/targets.py                      # docs/targets.png and the table
    python experiments/targets.py --rewards 1,0,0,0,0,0,0,0 --beta 0.5 --out /tmp/targets.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offpolicy_pessimism import group_mean, induced_target, pyplot, shifted_mean_advantages, soft_value  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
