"""Tests that read like the claims they check. Run: python -m pytest -q test_offpolicy_pessimism.py"""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import offpolicy_pessimism as op

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "16",
        "--eval-every", "3", "--warm-start-steps", "30"]


# ---------------------------------------------------------------------------------------------
# The Lambert-W target (eq. 2) and its regimes
# ---------------------------------------------------------------------------------------------
def test_lambert_w0_inverts_w_exp_w():
    z = torch.cat([torch.linspace(-1 / math.e, 0, 1001, dtype=torch.float64),
                   torch.logspace(-8, 8, 1001, dtype=torch.float64)])
    w = op.lambert_w0(z)
    assert torch.all(w >= -1)
    assert torch.allclose(w * w.exp(), z, rtol=1e-12, atol=1e-12)


def direct_minimiser(mu, advantages, beta):
    """argmin over softmax-parametrised pi of sum_y mu(y) (beta log(pi/mu) - A)^2 (eq. 1), by L-BFGS."""
    logits = mu.log().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        pi = torch.softmax(logits, -1)
        loss = (mu * (beta * (pi / mu).log() - advantages) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return torch.softmax(logits, -1).detach()


@pytest.mark.parametrize("regime", ["positive", "boundary", "negative"])
def test_lambert_target_matches_direct_minimiser(regime):
    beta = 0.5
    mu = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.10, 0.08], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    soft_value = {"positive": (mu * rewards).sum(),                            # mean: below the soft value
                  "boundary": beta * (mu * (rewards / beta).exp()).sum().log(),  # exactly the soft value
                  "negative": 0.2 * (mu * (rewards / 0.2).exp()).sum().log()}[regime]  # OAPL beta_v < beta
    advantages = rewards - soft_value
    c = op.induced_target_c(advantages[None], beta, mu[None])
    assert {"positive": c > 0, "boundary": c == 0, "negative": c < 0}[regime].all(), c
    induced = mu * op.induced_target_ratio(advantages[None], beta, c)[0]
    assert abs(induced.sum().item() - 1) < 1e-9
    assert torch.allclose(induced, direct_minimiser(mu, advantages, beta), atol=1e-6, rtol=0)


def test_pessimistic_target_puts_less_mass_on_correct_answers_than_boltzmann():
    rewards = torch.tensor([[1.0, 1, 0, 0, 0, 0, 1, 0]])
    positive = op.regime_diagnostics(op.shifted_mean_advantages(rewards, 0.5), rewards, 0.5)
    negative = op.regime_diagnostics(rewards - op.soft_value(rewards, 0.2), rewards, 0.5)
    assert positive["p_correct_induced"] < positive["p_correct_nominal"]
    assert negative["p_correct_induced"] > negative["p_correct_nominal"]


def random_reward_groups(groups=200, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    success = torch.rand(groups, 1, generator=generator)
    return (torch.rand(groups, size, generator=generator) < success).float()


def test_mean_baseline_is_never_in_the_negative_regime():
    rewards = random_reward_groups()
    c = op.induced_target_c(rewards - op.group_mean(rewards), beta=0.1)
    all_equal = (rewards == rewards[:, :1]).all(-1)
    assert all_equal.any() and (~all_equal).any()
    assert torch.all(c[~all_equal] > 0)
    assert torch.all(c[all_equal] == 0)


def test_oapl_value_temperature_sets_the_regime():
    rewards = random_reward_groups()
    mixed = ~(rewards == rewards[:, :1]).all(-1)
    beta = 0.1
    above = op.induced_target_c(rewards - op.soft_value(rewards, 2 * beta), beta)
    equal = op.induced_target_c(rewards - op.soft_value(rewards, beta), beta)
    below = op.induced_target_c(rewards - op.soft_value(rewards, beta / 2), beta)
    assert torch.all(above[mixed] > 0)
    assert torch.all(equal == 0)
    assert torch.all((below[mixed] < 0) | below[mixed].isnan())


def test_shifted_mean_is_always_pessimistic_and_neutral_on_equal_rewards():
    rewards = random_reward_groups()
    beta = 0.1
    advantages = op.shifted_mean_advantages(rewards, beta)
    c = op.induced_target_c(advantages, beta)
    assert torch.all(c > 0)
    equal = torch.ones(3, 8) * torch.tensor([[0.0], [1.0], [0.5]])
    c_equal = op.induced_target_c(op.shifted_mean_advantages(equal, beta), beta)
    assert torch.allclose(c_equal, torch.ones(3, dtype=torch.float64), atol=1e-9)
    ratio = op.induced_target_ratio(op.shifted_mean_advantages(equal, beta), beta, c_equal)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-9)  # pi_c = mu


# ---------------------------------------------------------------------------------------------
# The seven losses: values and gradient signs on hand-made inputs
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


def test_loss_values_on_hand_made_inputs():
    # at pi = mu the regression losses are mean(A^2); the mean-centred A is (0.75, -0.25, -0.25, -0.25)
    assert loss_and_grad("pmd")[0] == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4)
    assert loss_and_grad("shifted")[0] == pytest.approx((0.85 ** 2 + 3 * 0.15 ** 2) / 4)
    value = 0.2 * math.log((math.exp(5) + 3) / 4)
    assert loss_and_grad("oapl")[0] == pytest.approx(((1 - value) ** 2 + 3 * value ** 2) / 4)
    assert loss_and_grad("apo")[0] == pytest.approx(0.25)
    # GRPO advantages sum to zero, so the ratio-1 policy-gradient losses are zero
    assert loss_and_grad("ppo")[0] == pytest.approx(0.0, abs=1e-6)
    # reinforce: -mean((r - mean + delta) * sum_t log pi)
    sums = torch.tensor([-2.0, -3.0, -1.0, -2.0])
    assert loss_and_grad("reinforce")[0] == pytest.approx(-((torch.tensor([0.85, -0.15, -0.15, -0.15]) * sums).mean()).item())
    # the regression gradient: d/dlogp_t of mean (beta * log_ratio - A)^2 = 2 beta (beta log_ratio - A) / N
    _, grad, _ = loss_and_grad("pmd", policy_minus_behavior=0.5)
    log_ratio = torch.tensor([1.0, 1.5, 0.5, 1.0])
    expected = 2 * 0.1 * (0.1 * log_ratio - torch.tensor([0.75, -0.25, -0.25, -0.25])) / 4
    assert torch.allclose(grad[:, 0], expected, atol=1e-6)


def test_ppo_clip_stops_the_gradient_beyond_the_trust_region():
    _, grad, diagnostics = loss_and_grad("ppo", policy_minus_behavior=math.log(1.5))  # ratio 1.5 > 1.2
    assert torch.all(grad[0] == 0)  # positive advantage, ratio above 1 + eps: clipped
    assert torch.all(grad[1:][MASK[1:]] > 0)  # negative advantages are not clipped from above
    assert diagnostics["clip_fraction"] == pytest.approx(1.0)
    assert diagnostics["ratio_max"] == pytest.approx(1.5)


def test_tis_truncates_the_importance_weight_at_the_cap():
    _, grad_capped, diagnostics = loss_and_grad("tis", policy_minus_behavior=math.log(3.0))  # ratio 3 > cap 2
    _, grad_on_policy, _ = loss_and_grad("tis")
    assert torch.allclose(grad_capped, 2.0 * grad_on_policy)
    assert diagnostics["clip_fraction"] == pytest.approx(1.0)


def test_length_normalize_divides_the_sequence_log_ratio_by_the_length():
    token_values = torch.ones(4, 3)
    assert op.sequence_sum(token_values, MASK).tolist() == [2, 3, 1, 2]
    assert op.sequence_sum(token_values, MASK, length_normalize=True).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# The lagged generator
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = op.builtin_model()
    return model.eval(), tokenizer


def test_behavior_logprobs_equal_the_policy_at_staleness_zero(tiny):
    model, tokenizer = tiny
    prompts = ["7+3=", "45+21=", "99+29=", "0+0="]  # different lengths: left padding is exercised
    rollout = op.sample_groups(model, tokenizer, prompts, 4, 6, 0.7, torch.Generator().manual_seed(0))
    policy_logp, _ = op.completion_logprobs(model, rollout, 0.7)
    assert rollout.prompt_mask.sum(-1).unique().numel() > 1
    difference = (policy_logp.detach() - rollout.behavior_logp)[rollout.completion_mask]
    assert difference.abs().max().item() < 1e-5  # ratio 1 within 1e-5


def test_masks_come_from_the_first_eos_even_when_pad_equals_eos(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    prompt_ids = op.encode_prompts(tokenizer, ["12+3="] * 64)
    rollout = op.sample_completions(model, prompt_ids, 8, 3.0, eos, eos, torch.Generator().manual_seed(1))
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


def test_mass_leakage_is_one_when_the_policy_is_the_generator():
    ids = torch.tensor([[5, 2], [5, 2], [6, 2], [7, 2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    logp = torch.tensor([-1.0, -1.0, -2.0, -3.0])
    assert op.mass_leakage(logp, logp, ids, mask, 4)["mass_leakage"] == pytest.approx(1.0)
    shrunk = op.mass_leakage(logp - 1, logp, ids, mask, 4)  # pi = mu / e on every sampled completion
    assert shrunk["mass_leakage"] == pytest.approx(math.exp(-1))
    covered = math.exp(-1) + math.exp(-2) + math.exp(-3)  # the duplicate counts once
    assert shrunk["generator_mass_sampled"] == pytest.approx(covered)


# ---------------------------------------------------------------------------------------------
# The reward checker
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, answer, expected", [
    ("46", "46", 1.0), ("the answer is 46", "46", 1.0), ("12 then 46", "46", 1.0), ("46 then 12", "46", 0.0),
    ("#### 1,234", "1234", 1.0), ("so #### 5, not 7", "5", 1.0), ("\\boxed{-7}", "-7", 1.0), ("-7", "7", 0.0),
    ("46.0", "46", 1.0), ("+46", "46", 1.0), ("4 6", "46", 0.0), ("", "0", 0.0), ("no number", "0", 0.0),
])
def test_reward_checker_cases(completion, answer, expected):
    assert op.reward(completion, answer) == expected


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('rm -rf /')", "print(40 + 6)", "1" * 10_000_000, "\u0664\u0666", "\uff14\uff16", "4" * 200,
    "\\boxed{__import__('os')}", "#### 9" * 100,
])
def test_reward_checker_parses_never_executes_and_is_fast_on_hostile_strings(hostile):
    started = time.perf_counter()
    assert op.reward(hostile, "46") == 0.0
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------------------------------------
# The script end to end (in-process through main(), and once as a real subprocess)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm_out(tmp_path_factory):
    """An --out folder holding a cached (short) warm start, shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("warm")
    assert op.main(["--out", str(out), "--steps", "1", "--eval-size", "8", "--warm-start-steps", "30",
                    "--prompts-per-step", "2", "--group-size", "2"]) == 0
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
    return op.read_metrics(os.path.join(out, run, "metrics.jsonl"))


@pytest.mark.parametrize("loss", op.LOSSES)
def test_every_loss_runs_end_to_end(loss, warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--loss", loss, "--out", str(out), *TINY]) == 0
    assert "final accuracy" in capsys.readouterr().out
    metrics = metrics_of(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "eval_accuracy" in metrics[0] and "eval_accuracy" in metrics[-1]
    for key in ("loss", "reward_mean", "advantage_mean", "grad_norm", "entropy", "kl_generator_policy",
                "mass_leakage", "staleness", "rollout_tokens_per_s"):
        assert all(math.isfinite(m[key]) for m in metrics[1:]), key
    if loss in ("ppo", "tis"):
        assert "clip_fraction" in metrics[1] and "ratio_max" in metrics[1]
    if loss in ("oapl", "apo", "pmd", "shifted"):
        fractions = [metrics[1][k] for k in ("regime_positive", "regime_boundary", "regime_negative")]
        assert sum(fractions) == pytest.approx(1.0)
    if loss == "shifted":
        assert all(m["regime_positive"] == 1.0 for m in metrics[1:])


def test_generator_is_refreshed_every_lag_steps(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--out", str(out), "--lag", "3", "--lr", "1e-2", *TINY, "--steps", "7"]) == 0
    steps = metrics_of(out)[1:]
    assert [m["staleness"] for m in steps] == [0, 1, 2, 0, 1, 2, 0]
    for m in steps:
        if m["staleness"] == 0:  # just refreshed: the policy is the generator
            assert abs(m["log_ratio_mean"]) < 1e-5 and m["kl_generator_policy"] < 1e-6
        else:
            assert abs(m["log_ratio_mean"]) > 1e-4


def test_resume_after_an_interruption_gives_the_same_metrics(warm_out, tmp_path):
    def comparable(metrics):
        timing = {"rollout_seconds", "update_seconds", "rollout_tokens_per_s", "update_tokens_per_s", "peak_rss_gb"}
        return [{k: v for k, v in m.items() if k not in timing} for m in metrics]

    args = [*TINY, "--lag", "2", "--lr", "1e-3"]  # evaluates and checkpoints every 3 steps
    straight = fresh_out(warm_out, tmp_path, "straight")
    assert op.main(["--out", str(straight), *args, "--steps", "6"]) == 0
    interrupted = fresh_out(warm_out, tmp_path, "interrupted")
    assert op.main(["--out", str(interrupted), *args, "--steps", "3"]) == 0  # stops mid-cycle
    (run,) = [d for d in os.listdir(interrupted) if not d.startswith("warmstart_")]
    metrics_path = interrupted / run / "metrics.jsonl"
    with open(metrics_path, "a") as f:  # a step written after the checkpoint, as if killed mid-run
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    assert op.main(["--out", str(interrupted), *args, "--steps", "6", "--resume"]) == 0
    assert comparable(metrics_of(interrupted)) == comparable(metrics_of(straight))


def test_model_flag_loads_a_saved_model_and_tokenizer(tiny, tmp_path):
    model, tokenizer = tiny
    saved = tmp_path / "saved-model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    out = tmp_path / "out"
    assert op.main(["--model", str(saved), "--out", str(out), *TINY, "--warm-start-steps", "0"]) == 0
    (run,) = os.listdir(out)
    with open(out / run / "config.json") as f:
        assert json.load(f)["model_source"] == str(saved)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--out", str(out), *TINY, "--steps", "5", "--lr", "1e30", "--grad-clip", "1e30"]) == 1
    message = capsys.readouterr().err
    assert "at step" in message and "last good checkpoint" in message
    (run,) = [d for d in os.listdir(out) if not d.startswith("warmstart_")]
    assert torch.load(out / run / "checkpoint.pt", weights_only=False)["step"] == 0


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
    assert op.main(["--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing was built or written


def test_unknown_loss_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        op.main(["--loss", "dpo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dpo'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    assert op.main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_an_existing_run_is_never_overwritten(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--out", str(out), *TINY]) == 0
    assert op.main(["--out", str(out), *TINY]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_the_script_runs_as_a_command_and_fails_cleanly(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    script = os.path.join(HERE, "offpolicy_pessimism.py")
    done = subprocess.run([sys.executable, script, "--out", str(out), *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "warm-start accuracy | final accuracy" in done.stdout
    bad = subprocess.run([sys.executable, script, "--out", str(out), "--lag", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--lag must be at least 1" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The comparison grid
# ---------------------------------------------------------------------------------------------
GRID = ["--compare", "--losses", "ppo,shifted", "--lags", "1,2", "--seeds", "1", *TINY]


def test_grid_runs_every_cell_and_resumes_without_rerunning_finished_ones(warm_out, tmp_path, capsys):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--out", str(out), *GRID]) == 0
    assert "| ppo | 2 |" in capsys.readouterr().out
    cells = sorted(d for d in os.listdir(out) if "_lag" in d)
    assert len(cells) == 4 and (out / "compare.md").exists() and (out / "compare.csv").exists()
    stamps = {c: os.stat(out / c / "metrics.jsonl").st_mtime_ns for c in cells}
    shutil.rmtree(out / cells[0])                           # a cell the grid never reached
    os.remove(out / cells[1] / "summary.json")              # a cell stopped after its last checkpoint
    before = (out / cells[1] / "metrics.jsonl").read_text()
    assert op.main(["--out", str(out), *GRID]) == 0
    assert (out / cells[0] / "summary.json").exists() and (out / cells[1] / "summary.json").exists()
    assert (out / cells[1] / "metrics.jsonl").read_text() == before  # resumed, not rerun
    for cell in cells[2:]:
        assert os.stat(out / cell / "metrics.jsonl").st_mtime_ns == stamps[cell]  # finished: untouched


def test_grid_table_numbers_equal_the_cells_own_metrics(warm_out, tmp_path):
    out = fresh_out(warm_out, tmp_path)
    assert op.main(["--out", str(out), *GRID, "--seeds", "1,2"]) == 0
    cfg = op.parse_config(["--out", str(out), *GRID, "--seeds", "1,2"])
    with open(out / "compare.csv") as f:
        header, *lines = [line.strip().split(",") for line in f]
    table = {(row[0], int(row[1])): dict(zip(header, row)) for row in lines}
    assert len(table) == 4
    for loss, lag in table:
        cells = [c for c in op.grid_cells(cfg) if op.cell_label(c) == loss and c.lag == lag]
        runs = [op.read_metrics(os.path.join(op.run_folder(c), "metrics.jsonl")) for c in cells]
        finals = [[m["eval_accuracy"] for m in run if "eval_accuracy" in m][-1] for run in runs]
        assert float(table[loss, lag]["final_accuracy"]) == pytest.approx(sum(finals) / 2)
        assert int(table[loss, lag]["seeds"]) == 2
        leakage = [sum(m["mass_leakage"] for m in run[1:]) / len(run[1:]) for run in runs]
        assert float(table[loss, lag]["mass_leakage"]) == pytest.approx(sum(leakage) / 2)


def test_grid_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    op.plot_grid({("shifted", 16): [([{"step": 0, "eval_accuracy": 0.5}], {})]}, str(tmp_path))
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_grid_refuses_bad_lists_before_any_work(tmp_path, capsys):
    for argv, message in [(["--losses", "ppo,dpo"], "unknown dpo"), (["--lags", "1,x"], "--lags must be"),
                          (["--lags", "0"], "at least 1"), (["--resume"], "drop --resume")]:
        assert op.main(["--out", str(tmp_path / "out"), "--compare", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regime_preset_sweeps_value_temperatures_and_shifts():
    cells = op.grid_cells(op.parse_config(["--compare", "--preset", "regimes"]))
    assert {op.cell_label(c) for c in cells} == {"oapl beta_v=0.05", "oapl beta_v=0.1", "oapl beta_v=0.3",
                                                 "shifted shift=0.25", "shifted shift=1", "shifted shift=3"}
    assert {c.lag for c in cells} == {64} and len({op.run_folder(c) for c in cells}) == len(cells)


def test_grid_can_vary_beta_and_the_warm_start_strength():
    cfg = op.parse_config(["--compare", "--losses", "pmd,oapl", "--lags", "4", "--seeds", "1",
                           "--betas", "0.05,0.2", "--warm-starts", "300,1200", "--beta-values", "0.1,0.4"])
    cells = op.grid_cells(cfg)
    assert len(cells) == 2 * 2 * (1 + 2)
    assert {(c.beta, c.warm_start_steps) for c in cells} == {(0.05, 300), (0.05, 1200), (0.2, 300), (0.2, 1200)}
    assert "oapl beta_v=0.4 beta=0.05 warm=1200" in {op.cell_label(c) for c in cells}
    assert len({op.run_folder(c) for c in cells}) == len(cells) == len({op.cell_label(c) for c in cells})
