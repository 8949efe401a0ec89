"""A run's curves, drawn from its metrics.jsonl into curves.png in its folder (needs matplotlib): greedy
accuracy and the samples' mean reward; KL(mu || pi) per completion and mass leakage, the generator's
refreshes dotted; the shares of groups in each regime of eq. 2 and the mean advantage.

    python experiments/curves.py runs/shifted_lag16_beta0.1_seed1_05e528 [more run folders]

The trainer only writes numbers; this draws them, during a run (from the lines written so far) or after.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offpolicy_pessimism import read_lines  # noqa: E402


def pyplot(say_if_missing: bool = True):
    """matplotlib.pyplot, or None (with a message, unless asked not to) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if say_if_missing:
            print("plots skipped: matplotlib is not installed (pip install matplotlib to get them)")
        return None
    return plt


def draw_curves(plt, folder: str) -> str:
    """curves.png in the run folder: accuracy and reward; KL(mu || pi) and mass leakage; regimes. Returns its path."""
    with open(os.path.join(folder, "config.json")) as f:
        loss = json.load(f)["loss"]
    metrics = read_lines(os.path.join(folder, "metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]

    def series(key, lines=steps):  # (steps, values) of the lines that have the key
        return [m["step"] for m in lines if key in m], [m[key] for m in lines if key in m]

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(*series("eval_accuracy", metrics), marker="o", label="greedy accuracy (held out)")
    axes[0].plot(*series("reward_mean"), lw=0.6, alpha=0.7, label="mean reward of the samples")
    axes[1].plot(*series("kl_sequence"), label="KL(mu || pi) per completion")
    axes[1].plot(*series("mass_leakage"), label="mass leakage")
    for m in steps:
        if m["staleness"] == 0 and m["step"] > 1:
            axes[1].axvline(m["step"], color="grey", lw=0.4, ls=":")
    axes[1].set_title("dotted: generator refreshes", fontsize=8)
    for key, label in (("regime_positive", "groups at c > 0"), ("regime_boundary", "c = 0"),
                       ("regime_negative", "c < 0"), ("advantage_mean", "mean advantage")):
        axes[2].plot(*series(key), label=label)
    axes[2].set_title(f"{loss}: regimes of eq. 2 and the mean advantage" if "regime_positive" in steps[-1] else
                      f"{loss}: mean advantage", fontsize=8)
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend(fontsize=7, loc="center right")  # a fixed place: "best" searches every point
    figure.tight_layout()
    path = os.path.join(folder, "curves.png")
    figure.savefig(path + ".tmp.png", dpi=100)  # written, then renamed
    plt.close(figure)
    os.replace(path + ".tmp.png", path)
    return path


def main(argv: list[str] | None = None) -> int:
    folders = sys.argv[1:] if argv is None else argv
    if not folders or folders[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if folders else 2
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "metrics.jsonl")):
            print(f"error: {folder} holds no metrics.jsonl: give a run folder (runs/<loss>_lag...)", file=sys.stderr)
            return 2
        if not any("loss" in m for m in read_lines(os.path.join(folder, "metrics.jsonl"))):
            print(f"error: {folder} has no step yet: nothing to draw", file=sys.stderr)
            return 2
    plt = pyplot()
    if plt is None:
        return 2
    for folder in folders:
        print(f"curves: {draw_curves(plt, folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
