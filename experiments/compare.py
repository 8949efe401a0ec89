"""The comparison grid: the same budget for every (loss, lag, seed[, beta_v | shift]) cell, each an ordinary
run of offpolicy_pessimism.py in its own folder under --out; a finished cell is never rerun and an
interrupted one resumes, so the same command continues a grid. Then compare.md / compare.csv (final
accuracy over seeds, entropy, regimes, clip fraction, mass leakage, mean advantage, and the mean term
over the second half of each stale cycle), plots with matplotlib, and with several --warm-starts the gain
per start (start_sweep.md, gain_vs_start.png). Every trainer flag applies to every cell.

    python experiments/compare.py --preset lags --jobs 2

With --jobs N, N cells run at once, each in a process of its own (on a CPU, one thread each unless
OMP_NUM_THREADS says otherwise); the tables are the same whichever --jobs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curves import pyplot  # noqa: E402
from offpolicy_pessimism import (LOSSES, Config, UsageError, check_config, flag, load_model, load_task,  # noqa: E402
                                 mean, read_lines, resolve_defaults, run_command, run_folder, train,
                                 device_and_precision)

STRONG_WARM_START_STEPS = 900  # --preset strong-start: 0.915 greedy accuracy


@dataclass
class GridConfig(Config):
    """The trainer's flags, for every cell, and the grid's."""
    preset: str = flag("", "lags = 5 losses x lags 1-256 x 3 seeds; regimes = oapl/shifted sweep at lag 64; "
                           "mechanism = shift sweep, oapl and centred at lags 64/256; strong-start = lags at a "
                           f"{STRONG_WARM_START_STEPS}-step warm start; start-accuracy = ppo/pmd/oapl/shifted at lags "
                           "1/64 from five warm starts (greedy accuracy 0.11 to 0.92); real-model (needs --model) = "
                           "oapl and shifted at lags 1/16, pmd at 16, 3 seeds, 48 steps of 8 x 8 x 24 tokens; "
                           "published-temperatures = oapl (beta_v 1), apo (beta_v 0.5), pmd at beta 1e-3, lags "
                           "1-256, and at lag 64 with lr 1e-5; published-temperatures-real-model (needs --model) = "
                           "the same three at lag 16 with real-model's settings",
                       choices=("", "lags", "regimes", "mechanism", "strong-start", "start-accuracy", "real-model",
                                "published-temperatures", "published-temperatures-real-model"))
    losses: str = flag("ppo,tis,pmd,oapl,shifted", "comma-separated losses")
    lags: str = flag("1,16,64,256", "comma-separated lags")
    seeds: str = flag("1,2,3", "comma-separated seeds")
    beta_values: str = flag("", "comma-separated beta_v for oapl/apo cells (empty: --beta-value)")
    shifts: str = flag("", "comma-separated shifts for shifted cells (empty: --shift)")
    betas: str = flag("", "comma-separated beta for every cell (empty: --beta)")
    lrs: str = flag("", "comma-separated lr for every cell (empty: --lr)")
    warm_starts: str = flag("", "comma-separated --warm-start-steps, e.g. a weak and a strong start")
    jobs: int = flag(1, "cells run at once, each in a process of its own")


PRESETS = {
    "lags": {"losses": "ppo,tis,pmd,oapl,shifted", "lags": "1,16,64,256", "seeds": "1,2,3", "steps": 300},
    "regimes": {"losses": "oapl,shifted", "lags": "64", "seeds": "1,2", "beta_values": "0.05,0.1,0.3",
                "shifts": "0.25,1,3", "steps": 300},
    "mechanism": {"losses": "shifted,oapl,centred", "lags": "64,256", "seeds": "1,2,3", "beta_values": "0.2,0.3",
                  "shifts": "-2,-1,-0.5,-0.25,0,0.25,1", "steps": 300},
    "strong-start": {"losses": "ppo,tis,pmd,oapl,shifted", "lags": "1,64", "seeds": "1,2,3",
                     "warm_starts": str(STRONG_WARM_START_STEPS), "steps": 300},
    # warm starts of 350 / 450 / 525 / 600 / 900 steps: 0.110 / 0.240 / 0.415 / 0.635 / 0.915 greedy accuracy
    "start-accuracy": {"losses": "ppo,pmd,oapl,shifted", "lags": "1,64", "seeds": "1,2,3", "beta_values": "0.2",
                       "shifts": "1", "warm_starts": "350,450,525,600,900", "steps": 300},
    # a pretrained chat model on the built-in additions (SmolLM2-135M-Instruct: about 16% greedy to start);
    # lag 1 is the control that tells "learns faster on stale data" from "learns faster at any lag"
    "real-model": {"losses": "oapl,shifted,pmd", "lags": "1,16", "lags_of": {"pmd": "16"}, "seeds": "1,2,3",
                   "beta_values": "0.2", "shifts": "1", "steps": 48, "eval_every": 16, "eval_size": 200,
                   "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 24, "temperature": 0.6, "lr": 1e-5},
    # OAPL (beta 1e-3, beta_v 1) and A*-PO (beta 1e-3, beta_v 0.5) at the temperatures of their authors'
    # released scripts, pmd at the same beta as the control; the lags budget, then lag 64 again with the
    # authors' smaller steps (lr 1e-5). "and": a second block of cells, the same keys over the first's.
    "published-temperatures": {"losses": "oapl,apo,pmd", "lags": "1,16,64,256", "seeds": "1,2,3", "betas": "0.001",
                               "beta_values_of": {"oapl": "1", "apo": "0.5"}, "lrs": "0.0001", "steps": 300,
                               "and": {"lags": "64", "lrs": "0.00001"}},
}
PRESETS["published-temperatures-real-model"] = {
    **PRESETS["real-model"], "losses": "oapl,apo,pmd", "lags": "16", "lags_of": {}, "betas": "0.001",
    "beta_values_of": {"oapl": "1", "apo": "0.5"}}


def parse_list(text: str, kind, flag_name: str) -> list:
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"--{flag_name} must be a comma-separated list of {kind.__name__}, got {text!r}") from None
    if not values:
        raise UsageError(f"--{flag_name} is empty")
    return values


def grid_cells(cfg: GridConfig, preset: dict | None = None) -> list[GridConfig]:
    """One Config per cell; oapl/apo cells vary beta_v, shifted cells vary the shift."""
    flags = cfg
    preset = dict(PRESETS.get(cfg.preset, {}) if preset is None else preset)
    second_block = preset.pop("and", None)
    lags_of = {loss: parse_list(text, int, "lags") for loss, text in preset.pop("lags_of", {}).items()}
    beta_values_of = {loss: parse_list(text, float, "beta-values")
                      for loss, text in preset.pop("beta_values_of", {}).items()}
    cfg = dataclasses.replace(cfg, **preset)  # lags_of: a loss that runs at some of the lags only
    losses = parse_list(cfg.losses, str, "losses")
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        raise UsageError(f"--losses: unknown {', '.join(unknown)}; choose from {', '.join(LOSSES)}")
    lags, seeds = parse_list(cfg.lags, int, "lags"), parse_list(cfg.seeds, int, "seeds")
    if min(lags) < 1:
        raise UsageError(f"--lags must all be at least 1, got {cfg.lags}")
    beta_values = parse_list(cfg.beta_values, float, "beta-values") if cfg.beta_values else [cfg.beta_value]
    shifts = parse_list(cfg.shifts, float, "shifts") if cfg.shifts else [cfg.shift]
    betas = parse_list(cfg.betas, float, "betas") if cfg.betas else [cfg.beta]
    lrs = parse_list(cfg.lrs, float, "lrs") if cfg.lrs else [cfg.lr]
    warm_starts = parse_list(cfg.warm_starts, int, "warm-starts") if cfg.warm_starts else [cfg.warm_start_steps]
    if min(beta_values) <= 0 or min(betas) <= 0 or min(lrs) < 0:
        raise UsageError(f"--beta-values and --betas must all be positive and --lrs not negative, got "
                         f"{cfg.beta_values!r}, {cfg.betas!r}, {cfg.lrs!r}")
    if min(warm_starts) < -1:
        raise UsageError(f"--warm-starts must all be at least -1, got {cfg.warm_starts}")
    cells = []
    for warm_start_steps in warm_starts:
        for beta in betas:
            for lr in lrs:
                for loss in losses:
                    for lag in (lag for lag in lags if lag in lags_of.get(loss, lags)):
                        variants = ([{"beta_value": v} for v in beta_values_of.get(loss, beta_values)]
                                    if loss in ("oapl", "apo") else
                                    [{"shift": v} for v in shifts] if loss == "shifted" else [{}])
                        for variant in variants:
                            for seed in seeds:
                                cells.append(resolve_defaults(dataclasses.replace(
                                    cfg, preset="", loss=loss, lag=lag, seed=seed, beta=beta, lr=lr,
                                    warm_start_steps=warm_start_steps, **variant)))
    if second_block:  # the preset's second block of cells: its keys over the first's
        first = {key: value for key, value in PRESETS[flags.preset].items() if key != "and"}
        cells += grid_cells(flags, {**first, **second_block})
    return cells


def cell_label(cell: Config) -> str:
    """The table's row name: the loss, its swept parameter, and beta / warm start when those are swept."""
    extra = f" beta_v={cell.beta_value:g}" if cell.loss in ("oapl", "apo") else (
        f" shift={cell.shift:g}" if cell.loss == "shifted" else "")
    extra += f" beta={cell.beta:g}" if cell.betas else ""
    extra += f" lr={cell.lr:g}" if cell.lrs else ""
    extra += f" warm={cell.warm_start_steps}" if cell.warm_starts else ""
    return f"{cell.loss}{extra}"


def check_grid(cfg: GridConfig) -> None:
    """The trainer's checks for its cells, then the grid's lists."""
    if cfg.resume:
        raise UsageError("a grid resumes unfinished cells and skips finished ones by itself; drop --resume")
    if "real-model" in cfg.preset and not cfg.model:
        raise UsageError(f"--preset {cfg.preset} needs --model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct or its folder")
    if cfg.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {cfg.jobs}")
    check_config(cfg, one_run=False)
    grid_cells(cfg)  # raises UsageError for a bad list


def finished(cell: Config) -> bool:
    summary_path = os.path.join(run_folder(cell), "summary.json")
    if not os.path.exists(summary_path):
        return False
    with open(summary_path) as f:
        return json.load(f)["steps"] >= cell.steps


def run_cell(cell: Config, problems: tuple[list, list], quiet: bool = True) -> None:
    """One cell: a run of its own, resumed from its checkpoint when an earlier grid was stopped."""
    resume = os.path.exists(os.path.join(run_folder(cell), "checkpoint.pt"))
    train(dataclasses.replace(cell, resume=resume), problems, quiet=quiet)


def start_job(threads: int) -> None:
    """A job process: its share of the CPU's threads; Ctrl-C is the grid's to handle (it stops the jobs)."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_grid(cfg: GridConfig) -> list[dict]:
    """Run every unfinished cell, seed-major (a grid cut short has every setting's first seeds), --jobs at a
    time, then write compare.md / compare.csv / evaluations.md (and plots) under --out."""
    cells = sorted(grid_cells(cfg), key=lambda cell: cell.seed)
    problems = load_task(cfg)  # the same data for every cell
    for cell in {cell.warm_start_steps: cell for cell in cells if cell.warm_start_steps}.values():
        load_model(cell, problems[0], device_and_precision(cell)[0])  # each warm start built once, before any job
    todo = [cell for cell in cells if not finished(cell)]  # finished: never rerun
    if cfg.jobs == 1:
        for cell in tqdm(todo, desc="grid", dynamic_ncols=True):
            run_cell(cell, problems, quiet=False)
    elif todo:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, torch.get_num_threads() // cfg.jobs)
        pool = multiprocessing.get_context("spawn").Pool(cfg.jobs, initializer=start_job, initargs=(threads,))
        try:
            jobs = pool.imap_unordered(run_cell_in_job, [(cell, problems) for cell in todo])
            for _ in tqdm(jobs, total=len(todo), desc=f"grid, {cfg.jobs} jobs", dynamic_ncols=True):
                pass
        finally:
            pool.terminate()  # on Ctrl-C or an error too: each stopped cell resumes from its last checkpoint
    runs = grouped_runs(cells)
    rows, mean_term = grid_table(runs), mean_term_table(runs)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "compare.md"), "w") as f:
        f.write(format_grid_table(rows) + "\n" + (f"\n{format_mean_term_table(mean_term)}\n" if mean_term else ""))
    with open(os.path.join(cfg.out, "evaluations.md"), "w") as f:
        f.write(format_evaluations_table(evaluations_table(runs)) + "\n")
    with open(os.path.join(cfg.out, "compare.csv"), "w") as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in row.values()) + "\n" for row in rows)
    plot_grid(runs, cfg.out)
    plot_mechanism(runs, cfg.out)
    if len({cell.warm_start_steps for cell in cells}) > 1:
        start_rows = start_sweep_rows(cells)
        with open(os.path.join(cfg.out, "start_sweep.md"), "w") as f:
            f.write(format_start_sweep(start_rows) + "\n")
        plot_start_sweep(start_rows, cfg.out)
        tqdm.write(f"gain against the start accuracy: {os.path.join(cfg.out, 'start_sweep.md')}")
    return rows


def run_cell_in_job(cell_and_problems: tuple) -> None:
    run_cell(*cell_and_problems)


def grouped_runs(cells: list[Config]) -> dict[tuple, list[tuple[list[dict], dict]]]:
    """{(loss label, lag): [(metrics lines, summary) per seed]}, each cell's files read once."""
    runs: dict[tuple, list] = {}
    for cell in cells:
        folder = run_folder(cell)
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        runs.setdefault((cell_label(cell), cell.lag), []).append(
            (read_lines(os.path.join(folder, "metrics.jsonl")), summary))
    return runs


def std(values) -> float:
    """Population standard deviation of the values that are not None or NaN: the spread over seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    centre = mean(values)
    return math.sqrt(mean([(v - centre) ** 2 for v in values]))


def grid_table(grouped: dict[tuple, list[tuple[list[dict], dict]]]) -> list[dict]:
    """One row per (loss variant, lag): means over seeds of each cell's own metrics."""

    def over_steps(key, metrics, last=None):
        steps = [m[key] for m in metrics if key in m and "loss" in m]
        return mean(steps[-last:] if last else steps) if steps else None

    rows = []
    for (label, lag), cell_runs in grouped.items():
        runs = [metrics for metrics, _ in cell_runs]
        finals = [[m["eval_accuracy"] for m in run if "eval_accuracy" in m][-1] for run in runs]
        bests = [max(m["eval_accuracy"] for m in run if "eval_accuracy" in m) for run in runs]
        rows.append({
            "loss": label, "lag": lag, "seeds": len(runs), "final_accuracy": mean(finals),
            "final_accuracy_std": std(finals),
            "best_accuracy": mean(bests), "warm_start_accuracy": mean([run[0]["eval_accuracy"] for run in runs]),
            "final_entropy": mean([over_steps("entropy", run, last=10) for run in runs]),
            **{key: mean([over_steps(key, run) for run in runs])
               for key in ("regime_positive", "regime_boundary", "regime_negative", "clip_fraction", "mass_leakage",
                           "advantage_mean")},
            "ratio_max": max((m["ratio_max"] for run in runs for m in run if "ratio_max" in m), default=float("nan")),
            "minutes": mean([summary["minutes"] for _, summary in cell_runs]),
        })
    return rows


def format_grid_table(rows: list[dict]) -> str:
    dash_if_nan = lambda value, spec: "-" if math.isnan(value) else format(value, spec)  # noqa: E731
    lines = ["| loss | lag | final accuracy (mean +- std) | best | final entropy | c>0 / c=0 / c<0 | "
             "clip fraction | max ratio | mass leakage | mean advantage | minutes |", "|" + "---|" * 11]
    for r in rows:
        regime = ("-" if math.isnan(r["regime_positive"]) else
                  f"{r['regime_positive']:.2f} / {r['regime_boundary']:.2f} / {r['regime_negative']:.2f}")
        lines.append(f"| {r['loss']} | {r['lag']} | {r['final_accuracy']:.3f} +- {r['final_accuracy_std']:.3f} "
                     f"({r['seeds']}) | {r['best_accuracy']:.3f} | {r['final_entropy']:.3f} | {regime} | "
                     f"{dash_if_nan(r['clip_fraction'], '.3f')} | {dash_if_nan(r['ratio_max'], '.2f')} | "
                     f"{r['mass_leakage']:.3f} | {r['advantage_mean']:+.3f} | {r['minutes']:.2f} |")
    return "\n".join(lines)


def mean_term_table(grouped: dict[tuple, list[tuple[list[dict], dict]]]) -> list[dict]:
    """What the mean term asks of the group's mean log-ratio and what the policy did, per (loss variant, lag)
    with a group-constant baseline: over the second half of each stale cycle (staleness >= lag / 2), the
    mean over steps and seeds of -Abar / beta (`mean_term_target`), -dbar (`log_ratio_mean`), `kl_sequence`,
    `loss_mean_term` and `loss_centred`. Empty when no cell has them (lag 1 has no second half)."""
    rows = []
    for (label, lag), cell_runs in grouped.items():
        late = [m for run, _ in cell_runs for m in run if "mean_term_target" in m and m["staleness"] >= lag / 2]
        if late and lag > 1:
            rows.append({"loss": label, "lag": lag, "target": -mean(m["mean_term_target"] for m in late),
                         "achieved": -mean(m["log_ratio_mean"] for m in late),
                         **{key: mean(m[key] for m in late) for key in ("kl_sequence", "loss_mean_term", "loss_centred")}})
    return rows


def format_mean_term_table(rows: list[dict]) -> str:
    lines = ["| loss | lag | -Abar / beta (target of -dbar) | -dbar achieved | KL(mu ‖ pi) per completion | "
             "loss_mean_term | loss_centred |", "|" + "---|" * 7]
    lines += [f"| {r['loss']} | {r['lag']} | {r['target']:.2f} | {r['achieved']:.2f} | {r['kl_sequence']:.2f} | "
              f"{r['loss_mean_term']:.4f} | {r['loss_centred']:.4f} |" for r in rows]
    return "\n".join(lines)


def evaluations_table(grouped: dict[tuple, list[tuple[list[dict], dict]]]) -> list[dict]:
    """Per (loss variant, lag): greedy accuracy at each evaluation (mean and std over seeds), the sequence
    KL(mu || pi) on the last step before each refresh (staleness lag - 1; 0 at lag 1, where mu is pi) and
    the mean advantage, each averaged over the run's steps and then over seeds."""
    rows = []
    for (label, lag), cell_runs in grouped.items():
        runs = [metrics for metrics, _ in cell_runs]
        steps = sorted({m["step"] for run in runs for m in run if "eval_accuracy" in m})
        at = {step: [m["eval_accuracy"] for run in runs for m in run if m["step"] == step and "eval_accuracy" in m]
              for step in steps}
        rows.append({"loss": label, "lag": lag, "seeds": len(runs),
                     "accuracy": {step: (mean(values), std(values)) for step, values in at.items()},
                     "kl_before_refresh": mean(mean(m["kl_sequence"] for m in run if "loss" in m and
                                                    m["staleness"] == lag - 1) for run in runs),
                     "advantage_mean": mean(mean(m["advantage_mean"] for m in run if "loss" in m) for run in runs)})
    return rows


def format_evaluations_table(rows: list[dict]) -> str:
    steps = sorted({step for r in rows for step in r["accuracy"]})
    lines = ["| loss | lag | seeds | " + " | ".join(f"step {step}" for step in steps) +
             " | KL(mu ‖ pi) before a refresh | mean advantage |", "|" + "---|" * (len(steps) + 5)]
    for r in rows:
        accuracy = " | ".join("{:.3f} ± {:.3f}".format(*r["accuracy"][step]) if step in r["accuracy"] else "-"
                              for step in steps)
        lines.append(f"| {r['loss']} | {r['lag']} | {r['seeds']} | {accuracy} | {r['kl_before_refresh']:.3f} | "
                     f"{r['advantage_mean']:+.3f} |")
    return "\n".join(lines)


def plot_grid(grouped: dict[tuple, list[tuple[list[dict], dict]]], out: str) -> None:
    """accuracy.png (mean +- std over seeds), entropy.png, regimes.png under --out, one panel per lag (means
    over seeds); skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    lags = sorted({lag for _, lag in grouped})
    colour = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for label, _ in grouped))}  # one per loss
    for name, key, title in (("accuracy", "eval_accuracy", "greedy accuracy"), ("entropy", "entropy", "token entropy"),
                             ("regimes", "regime_positive", "fraction of groups with c > 0")):
        figure, axes = plt.subplots(1, len(lags), figsize=(4 * len(lags), 3.2), squeeze=False, sharey=True)
        for axis, lag in zip(axes[0], lags):
            for (label, cell_lag), cell_runs in grouped.items():
                points = [m for run, _ in cell_runs for m in run if key in m] if cell_lag == lag else []
                steps = sorted({m["step"] for m in points})  # the mean over seeds at each step
                if steps:
                    at = [[m[key] for m in points if m["step"] == s] for s in steps]
                    means, spreads = [mean(values) for values in at], [std(values) for values in at]
                    axis.plot(steps, means, label=label, color=colour[label])
                    if key == "eval_accuracy":  # the spread over seeds: mean +- std
                        axis.fill_between(steps, [m - s for m, s in zip(means, spreads)],
                                          [m + s for m, s in zip(means, spreads)], color=colour[label], alpha=0.15,
                                          linewidth=0)
            axis.set_title(f"lag {lag}")
            axis.set_xlabel("step")
        axes[0][0].set_ylabel(title)
        figure.legend(handles=[plt.Line2D([], [], color=c, label=label) for label, c in colour.items()], fontsize=7,
                      loc="lower center", ncol=min(len(colour), 3))  # every label, whichever panels it is in
        figure.tight_layout(rect=(0, 0.06 * math.ceil(len(colour) / 3), 1, 1))
        figure.savefig(os.path.join(out, f"{name}.png"), dpi=110)
        plt.close(figure)


def plot_mechanism(grouped: dict[tuple, list[tuple[list[dict], dict]]], out: str) -> None:
    """The mean term's plots: final accuracy and mass leakage against the mean advantage (a point
    per cell and seed; marker: filled when most groups are at c > 0), and the sequence KL(mu || pi)
    over a stale cycle per loss, with the mean term's prediction -Abar / beta dashed."""
    plt = pyplot()
    if plt is None:
        return
    losses = sorted({label.split()[0] for label, _ in grouped})
    colour = {loss: f"C{i}" for i, loss in enumerate(losses)}
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (label, lag), cell_runs in grouped.items():
        for run, _ in cell_runs:
            steps = [m for m in run if "loss" in m]
            x = mean([m["advantage_mean"] for m in steps])
            positive = mean([m.get("regime_positive", 0.0) for m in steps]) > 0.5
            style = dict(color=colour[label.split()[0]], marker="o" if positive else "x", s=18)
            axes[0].scatter(x, [m["eval_accuracy"] for m in run if "eval_accuracy" in m][-1], **style)
            axes[1].scatter(x, mean([m["mass_leakage"] for m in steps]), **style)
    for axis, title in zip(axes, ("final greedy accuracy", "mass leakage (mean over steps)")):
        axis.set_xlabel("mean advantage")
        axis.set_title(title, fontsize=9)
    axes[1].legend(handles=[plt.Line2D([], [], color=c, marker="o", ls="", label=loss) for loss, c in colour.items()],
                   fontsize=7, title="o: c > 0 in most groups, x: not", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, "mean_advantage.png"), dpi=110)
    plt.close(figure)
    lags, labels = sorted({lag for _, lag in grouped if lag > 1}), list(dict.fromkeys(label for label, _ in grouped))
    if not lags:  # lag 1 has no stale cycle: mu is pi at every step
        return
    figure, axes = plt.subplots(1, len(lags), figsize=(4.5 * len(lags) + 2, 3.6), squeeze=False)
    for axis, lag in zip(axes[0], lags):
        for (label, cell_lag), cell_runs in grouped.items():
            steps = [m for run, _ in cell_runs for m in run if "loss" in m] if cell_lag == lag else []
            if not steps:
                continue
            staleness, line_colour = sorted({m["staleness"] for m in steps}), plt.cm.tab20(labels.index(label) % 20)
            axis.plot(staleness, [mean([m["kl_sequence"] for m in steps if m["staleness"] == s]) for s in staleness],
                      label=label, color=line_colour, lw=1)
            if "mean_term_target" in steps[0]:
                axis.axhline(max(0.0, -mean([m["mean_term_target"] for m in steps])), color=line_colour, ls="--",
                             lw=0.8)
        axis.set_yscale("symlog", linthresh=0.1)
        axis.set_title(f"lag {lag}: KL(mu || pi) per sequence; dashed: max(0, -Abar / beta)", fontsize=8)
        axis.set_xlabel("staleness (steps since the refresh)")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(os.path.join(out, "kl_stale_cycle.png"), dpi=110)
    plt.close(figure)


def start_sweep_rows(cells: list[Config]) -> list[dict]:
    """One row per (loss variant, lag, warm start): the start accuracy, the gain (final minus start accuracy)
    and the sequence KL(mu || pi) just before each refresh (mean over the run), each as mean and std over seeds."""
    seeds_of: dict[tuple, list] = {}
    for cell in cells:
        metrics = read_lines(os.path.join(run_folder(cell), "metrics.jsonl"))
        evals = [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m]
        before_refresh = [m["kl_sequence"] for m in metrics if "loss" in m and m["staleness"] == cell.lag - 1]
        label = cell_label(dataclasses.replace(cell, warm_starts=""))
        seeds_of.setdefault((label, cell.lag, cell.warm_start_steps), []).append(
            {"start": evals[0], "gain": evals[-1] - evals[0], "kl_before_refresh": mean(before_refresh)})
    rows = []
    for (label, lag, warm_start_steps), seeds in seeds_of.items():
        row = {"loss": label, "lag": lag, "warm_start_steps": warm_start_steps, "seeds": len(seeds)}
        for key in ("start", "gain", "kl_before_refresh"):
            row[key], row[key + "_std"] = mean(seed[key] for seed in seeds), std(seed[key] for seed in seeds)
        rows.append(row)
    return rows


def format_start_sweep(rows: list[dict]) -> str:
    """The gain (mean +- std over seeds) per loss and lag (rows) and warm start (columns)."""
    starts = sorted({(r["warm_start_steps"], r["start"]) for r in rows})
    lines = ["| loss | lag | " + " | ".join(f"start {acc:.2f} ({steps} steps)" for steps, acc in starts) + " |",
             "|---|---|" + "---|" * len(starts)]
    for loss, lag in dict.fromkeys((r["loss"], r["lag"]) for r in rows):
        gains = {r["warm_start_steps"]: f"{r['gain']:+.3f} +- {r['gain_std']:.3f}" for r in rows
                 if (r["loss"], r["lag"]) == (loss, lag)}
        lines.append(f"| {loss} | {lag} | " + " | ".join(gains.get(steps, "-") for steps, _ in starts) + " |")
    return "\n".join(lines)


def plot_start_sweep(rows: list[dict], out: str) -> None:
    """gain_vs_start.png: the gain (top) and the KL(mu || pi) before each refresh (bottom) against the start
    accuracy, a line per loss, a panel per lag, seeds' std as error bars; skipped without matplotlib."""
    plt = pyplot()
    if plt is None:
        return
    lags = sorted({r["lag"] for r in rows})
    figure, axes = plt.subplots(2, len(lags), figsize=(4.5 * len(lags), 6.4), squeeze=False, sharex=True,
                                sharey="row")  # lag 1 samples from pi itself: its KL is 0 on the others' scale
    for column, lag in enumerate(lags):
        for loss in dict.fromkeys(r["loss"] for r in rows):
            points = sorted((r for r in rows if (r["loss"], r["lag"]) == (loss, lag)), key=lambda r: r["start"])
            for axis, key in zip(axes[:, column], ("gain", "kl_before_refresh")):
                axis.errorbar([r["start"] for r in points], [r[key] for r in points],
                              yerr=[r[key + "_std"] for r in points], marker="o", capsize=3, label=loss)
        axes[0, column].axhline(0.0, color="grey", lw=0.5)
        axes[0, column].set_title(f"lag {lag}: gain in greedy accuracy (final - start)", fontsize=8)
        axes[1, column].set_title(f"lag {lag}: KL(mu || pi) per sequence before each refresh", fontsize=8)
        axes[1, column].set_yscale("symlog", linthresh=0.1)
        axes[1, column].set_xlabel("greedy accuracy at the start of RL")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(os.path.join(out, "gain_vs_start.png"), dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    def grid(cfg: GridConfig) -> None:
        rows = run_grid(cfg)
        print(format_grid_table(rows))
        print(f"tables: {os.path.join(cfg.out, 'compare.md')}, {os.path.join(cfg.out, 'compare.csv')}")

    return run_command(argv, GridConfig, grid, check=check_grid, description=__doc__.split("\n\n")[0],
                       interrupted="rerun the same command: finished cells are kept, stopped ones resume")


if __name__ == "__main__":
    sys.exit(main())
