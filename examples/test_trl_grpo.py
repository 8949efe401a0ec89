"""Tests of the TRL recipe (examples/trl_grpo.py): several processes, the settings it refuses, any lag, TRL's keys.

    OMP_NUM_THREADS=1 python -m pytest -q examples/test_trl_grpo.py

Run as a script under torchrun, this file is the recorder the two-process test launches (see `record_run`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "examples"))
import offpolicy_pessimism as op  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="trl is not installed (pip install trl==1.16.0)")
BETA, SHIFT, BETA_VALUE, G = 0.1, 1.0, 0.2, 4


@pytest.fixture(scope="module")
def recipe():
    import trl_grpo  # imported here: without trl it exits, and the module must still be collected (and skipped)

    return trl_grpo


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = op.builtin_model()
    return model.eval(), tokenizer


def even_length_checker(completion: str, answer: str) -> float:
    """A stand-in checker that gives an untrained model mixed rewards: 1 for an even-length completion."""
    return float(len(completion) % 2 == 0)


def even_length_reward(completions, **kwargs) -> list[float]:
    return [even_length_checker(completion, "") for completion in completions]


def saved_tiny_model(folder, **config_changes) -> str:
    """The built-in tiny model and tokenizer saved where from_pretrained finds them, with config changes."""
    model, tokenizer = op.builtin_model()
    for name, value in config_changes.items():
        setattr(model.config, name, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def small_config(recipe, folder, **changes):
    """A RatioFreeConfig small enough for 2 CPU cores: 8 rows (2 prompts x G) per step, lag 2, fp32 (TRL's
    default bf16 autocasts every forward, which our fp32 recomputations would differ from by ~1e-3)."""
    settings = dict(output_dir=str(folder), ratio_free_loss="oapl", regression_beta=BETA, shift=SHIFT,
                    beta_value=BETA_VALUE, max_steps=2, per_device_train_batch_size=8, steps_per_generation=2,
                    num_generations=G, max_completion_length=5, learning_rate=1e-2, save_strategy="no",
                    report_to="none", use_cpu=True, bf16=False, seed=1, gradient_checkpointing=False)
    return recipe.RatioFreeConfig(**{**settings, **changes})


def small_trainer(recipe, tmp_path, reward=even_length_reward, **changes):
    model, tokenizer = op.builtin_model()
    return recipe.RatioFreeGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward,
                                       args=small_config(recipe, tmp_path / "trl", **changes),
                                       train_dataset=recipe.addition_dataset(16))


# ---------------------------------------------------------------------------------------------
# Several processes: each keeps its rows of advantages computed on the gathered groups
# ---------------------------------------------------------------------------------------------
def record_run(folder: str, loss: str) -> None:
    """In each process of a 2-process launch: train 4 steps at lag 2 with 3 rows per process and step (so a
    group of 4 straddles the processes), and save per step this process's rows, TRL's mu log-probs, the
    advantages, the loss and its gradient, the weights, and the gradient averaged over the processes."""
    import trl_grpo as recipe

    records = []

    class Recorder(recipe.RatioFreeGRPOTrainer):
        def _compute_loss(self, model, inputs):
            weights = {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
            loss = super()._compute_loss(model, inputs)
            grads = torch.autograd.grad(loss, [p for p in model.parameters()], retain_graph=True)
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
            records.append({**{key: inputs[key] for key in keys}, "weights": weights,
                                 "old_logp": inputs.get("old_per_token_logps"), "loss": loss.detach(),
                                 "grad": torch.cat([g.flatten() for g in grads])})
            return loss

        def training_step(self, model, inputs, num_items_in_batch):
            output = super().training_step(model, inputs, num_items_in_batch)  # backward: DDP averaged the grads
            records[-1]["averaged_grad"] = torch.cat([p.grad.flatten() for p in model.parameters()])
            return output

    model, tokenizer = op.builtin_model()
    config = small_config(recipe, os.path.join(folder, "trl"), ratio_free_loss=loss, max_steps=4,
                          per_device_train_batch_size=3)
    trainer = Recorder(model=model, processing_class=tokenizer, reward_funcs=even_length_reward, args=config,
                       train_dataset=recipe.addition_dataset(64))
    trainer.train()
    torch.save({"world": trainer.accelerator.num_processes, "records": records},
               os.path.join(folder, f"rank{trainer.accelerator.process_index}.pt"))


def trl_token_logps(model, row: dict) -> torch.Tensor:
    """Per-token log-probs of the completions as TRL computes them (one forward, temperature 1)."""
    width = row["completion_ids"].shape[1]
    logits = model(input_ids=torch.cat([row["prompt_ids"], row["completion_ids"]], 1),
                   attention_mask=torch.cat([row["prompt_mask"], row["completion_mask"]], 1)).logits
    logp = torch.log_softmax(logits[:, -width - 1:-1].float(), -1)
    return logp.gather(-1, row["completion_ids"].unsqueeze(-1)).squeeze(-1)


def model_with(weights: dict):
    model = op.builtin_model()[0]
    model.load_state_dict(weights)
    return model


def texts(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]


def our_advantages(loss: str, rewards: torch.Tensor) -> torch.Tensor:
    """A (groups, G) from our loss functions' diagnostics (the log-probs do not enter the advantage)."""
    zeros, mask = torch.zeros(rewards.numel(), 1), torch.ones(rewards.numel(), 1, dtype=torch.bool)
    return {"shifted": lambda: op.shifted_loss(zeros, zeros, mask, rewards, BETA, SHIFT),
            "oapl": lambda: op.oapl_loss(zeros, zeros, mask, rewards, BETA, BETA_VALUE),
            "pmd": lambda: op.pmd_loss(zeros, zeros, mask, rewards, BETA)}[loss]()[1]["advantages"]


def test_two_processes_train_with_our_loss_and_average_to_the_one_process_gradient(tmp_path):
    loss = "oapl"  # its soft-value baseline is the one a partial group would get most wrong
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              os.path.abspath(__file__), str(tmp_path), loss]
    done = subprocess.run(launch, cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [run["world"] for run in runs] == [2, 2]
    steps = list(zip(runs[0]["records"], runs[1]["records"]))
    assert len(steps) == 4
    tokenizer = op.builtin_model()[1]
    straddling, mixed = 0, 0
    for step, pair in enumerate(steps):
        generation = steps[step - step % 2: step - step % 2 + 2]  # lag 2: steps 0-1 and 2-3 share a generation
        rows = [row for both in generation for row in both]
        prompts = [p for row in rows for p in texts(tokenizer, row["prompt_ids"], row["prompt_mask"])]
        completions = [c for row in rows for c in texts(tokenizer, row["completion_ids"], row["completion_mask"])]
        groups = {p: [i for i, q in enumerate(prompts) if q == p] for p in dict.fromkeys(prompts)}
        assert all(len(members) == G for members in groups.values())  # whole groups across both processes
        rewards = torch.tensor([[even_length_checker(completions[i], "") for i in members]
                                for members in groups.values()])
        advantage_of = dict(zip([i for members in groups.values() for i in members],
                                our_advantages(loss, rewards).flatten().tolist()))
        straddling += sum(len({i // 3 % 2 for i in members}) == 2 for members in groups.values())  # rank of row i
        mixed += int(((rewards > 0).any(1) & (rewards < 1).any(1)).any())

        assert torch.equal(pair[0]["averaged_grad"], pair[1]["averaged_grad"])
        policy, behavior = model_with(pair[0]["weights"]), model_with(generation[0][0]["weights"])
        first_row = 6 * (step % 2)  # where this step's rows of rank 0 start among the generation's rows
        log_ratios, advantages = [], []
        for rank, row in enumerate(pair):
            assert all(torch.equal(row["weights"][k], pair[0]["weights"][k]) for k in row["weights"])
            policy_logp = trl_token_logps(policy, row)
            with torch.no_grad():
                behavior_logp = trl_token_logps(behavior, row)
            assert row["old_logp"] is not None  # lag 2: TRL recomputes mu's log-probs every step
            mask = row["completion_mask"].bool()
            assert torch.allclose(row["old_logp"][mask], behavior_logp[mask], atol=1e-5)  # mu: the sampling policy
            mine = [advantage_of[first_row + 3 * rank + j] for j in range(3)]
            assert torch.allclose(row["advantages"], torch.tensor(mine), atol=1e-6)
            log_ratio = op.sequence_sum(policy_logp - behavior_logp, mask)
            ours = op.squared_regression(log_ratio, row["advantages"], BETA)
            assert row["loss"].item() == pytest.approx(ours.item(), rel=1e-5, abs=1e-7)
            grads = torch.autograd.grad(ours, list(policy.parameters()), retain_graph=True)
            assert torch.allclose(row["grad"], torch.cat([g.flatten() for g in grads]), atol=1e-6, rtol=1e-4)
            log_ratios.append(log_ratio)
            advantages.append(row["advantages"])
        one_process = op.squared_regression(torch.cat(log_ratios), torch.cat(advantages), BETA)  # all 6 rows
        grads = torch.autograd.grad(one_process, list(policy.parameters()))
        assert torch.allclose(pair[0]["averaged_grad"], torch.cat([g.flatten() for g in grads]), atol=1e-6, rtol=1e-4)
        if step % 2:  # staleness 1: the policy has moved away from mu
            assert (policy_logp - behavior_logp).abs().max() > 1e-4
    assert straddling >= 2 and mixed >= 1  # groups cut by the process boundary, rewards that differ in a group


# ---------------------------------------------------------------------------------------------
# Refusals: each setting that breaks eq. 1, with its reason, when the config is built
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, reason", [
    ({"num_iterations": 2}, "num_iterations must be 1"),
    ({"min_p": 0.05}, "min_p must be unset"),
    ({"repetition_penalty": 1.2}, "repetition_penalty must be 1"),
    ({"generation_kwargs": {"num_beams": 2, "use_cache": True}}, "num_beams can change how tokens are sampled"),
    ({"generation_kwargs": {"suppress_tokens": [3]}}, "suppress_tokens can change"),
    ({"use_vllm": True}, "drops TRL's importance_sampling_ratio correction"),
    ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation must be"),
    ({"scale_rewards": "batch"}, "scale_rewards must be 'none'"),
    ({"disable_dropout": False}, "disable_dropout must be True"),
    ({"top_k": 5}, "sampling must be plain"),
    ({"top_p": 0.9}, "sampling must be plain"),
    ({"beta": 0.04}, "KL weight"),
])
def test_config_refuses_each_setting_that_breaks_eq1_in_one_line(recipe, tmp_path, bad, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        small_config(recipe, tmp_path, **bad)
    assert "\n" not in str(refused.value)


def test_config_keeps_plain_settings_and_forces_no_dropout(recipe, tmp_path):
    config = small_config(recipe, tmp_path, generation_kwargs={"use_cache": True})
    assert config.disable_dropout and config.scale_rewards == "none" and config.num_iterations == 1


def test_an_untested_trl_version_is_refused_unless_allowed(recipe, tmp_path, monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ValueError, match=r"trl 1\.17\.0 is installed, the recipe is tested with trl 1\.16\.0"):
        small_config(recipe, tmp_path)
    assert small_config(recipe, tmp_path, allow_untested_trl=True).allow_untested_trl
    assert recipe.main(["--steps", "1", "--out", str(tmp_path)]) == 2  # main refuses it too, before any model


def test_a_plain_grpo_config_is_refused_when_the_trainer_is_built(recipe, tmp_path):
    from trl import GRPOConfig

    model, tokenizer = op.builtin_model()
    plain = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=G, report_to="none",
                       use_cpu=True)
    with pytest.raises(TypeError, match="needs args=RatioFreeConfig"):
        recipe.RatioFreeGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=even_length_reward,
                                    args=plain, train_dataset=recipe.addition_dataset(8))


def test_tools_are_refused(recipe, tmp_path):
    def calculator(expression: str) -> str:
        """Adds numbers.

        Args:
            expression: the sum to compute
        """
        return expression

    model, tokenizer = op.builtin_model()
    with pytest.raises(ValueError, match="tools is refused"):
        recipe.RatioFreeGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=even_length_reward,
                                    args=small_config(recipe, tmp_path), train_dataset=recipe.addition_dataset(8),
                                    tools=[calculator])


def test_a_model_with_dropout_is_refused_naming_the_setting(recipe, tmp_path):
    folder = saved_tiny_model(tmp_path / "dropout-model", attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"dropout on \(attention_dropout=0\.1\)"):
        recipe.RatioFreeGRPOTrainer(model=folder, processing_class=op.builtin_model()[1],
                                    reward_funcs=even_length_reward, args=small_config(recipe, tmp_path / "trl"),
                                    train_dataset=recipe.addition_dataset(8))
    assert recipe.dropout_settings({"hidden_dropout_prob": 0.0, "resid_pdrop": 0.1, "text_config": {"dropout": 0.2},
                                    "use_dropout": True}) == ["resid_pdrop=0.1", "text_config.dropout=0.2"]


def test_a_completion_without_reward_is_refused(recipe, tmp_path):
    def reward_with_a_gap(completions, **kwargs):
        return [None] + even_length_reward(completions)[1:]  # TRL turns None into NaN

    trainer = small_trainer(recipe, tmp_path, reward=reward_with_a_gap, max_steps=1)
    with pytest.raises(ValueError, match=r"1 completion\(s\) got no reward"):
        trainer.train()


# ---------------------------------------------------------------------------------------------
# TRL's keys: mu's log-probs are there exactly when TRL's condition says; a renamed key fails loudly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lag", [1, 2])
def test_old_logps_are_in_the_inputs_exactly_when_trls_condition_says(recipe, tmp_path, lag):
    trainer = small_trainer(recipe, tmp_path, steps_per_generation=lag, max_steps=2)
    seen, original = [], trainer._compute_loss

    def spy(model, inputs):
        seen.append("old_per_token_logps" in inputs)
        return original(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert trainer.trl_records_old_logps() == (lag > 1)
    assert seen == [lag > 1] * 2


def test_a_renamed_old_logps_key_fails_loudly(recipe, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    original = GRPOTrainer._generate_and_score_completions

    def renamed(self, inputs):  # what a TRL that renamed the key would hand over
        output = original(self, inputs)
        output["old_logps"] = output.pop("old_per_token_logps")
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", renamed)
    trainer = small_trainer(recipe, tmp_path, max_steps=1)
    with pytest.raises(RuntimeError, match="TRL computed no `old_per_token_logps`.*old_logps"):
        trainer.train()


# ---------------------------------------------------------------------------------------------
# main(): any lag the task can feed, one-line errors, the learning rate
# ---------------------------------------------------------------------------------------------
def test_lag_200_trains_and_a_lag_past_the_task_is_refused_naming_the_largest(recipe, tmp_path, capsys):
    assert recipe.main(["--lag", "200", "--steps", "1", "--out", str(tmp_path)]) == 0
    assert "'step': 1" in capsys.readouterr().out
    assert recipe.main(["--lag", "701", "--steps", "1", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "the largest lag is 700" in error


def test_the_prompt_set_grows_with_the_lag_and_the_steps(recipe):
    assert recipe.prompts_to_train(steps=8, lag=4, prompts_per_step=4, available=2800) == 32
    assert recipe.prompts_to_train(steps=1, lag=129, prompts_per_step=4, available=2800) == 516  # > the old 512
    assert recipe.prompts_to_train(steps=9, lag=4, prompts_per_step=4, available=2800) == 48  # 3 generations
    assert recipe.prompts_to_train(steps=1000, lag=4, prompts_per_step=4, available=2800) == 2800  # then epochs
    with pytest.raises(ValueError, match="the largest lag is 350"):
        recipe.prompts_to_train(steps=1, lag=351, prompts_per_step=8, available=2800)


def test_main_errors_are_one_line_on_stderr_with_exit_2(recipe, tmp_path, capsys):
    assert recipe.main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no-such-model" in error and "Traceback" not in error
    with pytest.raises(SystemExit) as stopped:
        recipe.main(["--lag", "0"])
    assert stopped.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_lr_defaults_to_1e4_built_in_and_1e6_with_a_model(recipe, tmp_path):
    def lr(*flags):
        return recipe.recipe_config(recipe.parse_args(["--out", str(tmp_path), *flags])).learning_rate

    assert lr() == 1e-4
    assert lr("--model", "some/model") == 1e-6
    assert lr("--model", "some/model", "--lr", "3e-5") == 3e-5


if __name__ == "__main__":
    record_run(sys.argv[1], sys.argv[2])


# ---------------------------------------------------------------------------------------------
# One process, trl bf16 defaults: examples/trl_grpo.py's GRPOTrainer subclass computes our loss on TRL's tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["shifted", "oapl", "pmd"])
def test_trl_recipe_trains_on_stale_completions_with_our_loss_and_gradient(loss, tiny, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo_trainer

    import trl_grpo as recipe

    model, tokenizer = tiny
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    policy, tokenizer = op.load_pretrained(str(folder))
    monkeypatch.setattr(grpo_trainer, "shuffle_sequence_dict", lambda batch: batch)  # micro-batches of whole groups
    dataset = recipe.addition_dataset(32)
    answers = dict(zip(dataset["prompt"], dataset["answer"]))

    def reward(completions, answer, **kwargs):  # mixed rewards, so every baseline differs from the others
        return [even_length_checker(completion, reference) for completion, reference in zip(completions, answer)]

    config = recipe.RatioFreeConfig(
        output_dir=str(tmp_path / "trl"), ratio_free_loss=loss, regression_beta=0.1, shift=1.0, beta_value=0.2,
        max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=2,  # lag 2
        num_generations=4, max_completion_length=5, learning_rate=1e-2, beta=0.0, scale_rewards="none", top_p=1.0,
        top_k=0, save_strategy="no", report_to="none", use_cpu=True, seed=1, gradient_checkpointing=False)
    trainer = recipe.RatioFreeGRPOTrainer(model=policy, processing_class=tokenizer, reward_funcs=reward, args=config,
                                          train_dataset=dataset)
    start = [p.detach().clone() for p in policy.parameters()]
    checked, original = [], trainer._compute_loss

    def checked_loss(model, inputs):
        ids, mask = inputs["completion_ids"], inputs["completion_mask"].bool()
        policy_logp = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], ids], 1), torch.cat([inputs["prompt_mask"], mask.long()], 1),
            ids.shape[1])[0]
        behavior_logp = inputs["old_per_token_logps"]  # lag 2: TRL recomputes mu's log-probs
        texts = [tokenizer.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]
        prompts = [tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True)
                   for row, keep in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
        rewards = torch.tensor([even_length_checker(t, answers[p]) for t, p in zip(texts, prompts)]).view(-1, 4)
        ours = {"shifted": lambda: op.shifted_loss(policy_logp, behavior_logp, mask, rewards, 0.1, 1.0),
                "oapl": lambda: op.oapl_loss(policy_logp, behavior_logp, mask, rewards, 0.1, 0.2),
                "pmd": lambda: op.pmd_loss(policy_logp, behavior_logp, mask, rewards, 0.1)}[loss]
        expected, diagnostics = ours()
        got = original(model, inputs)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(inputs["advantages"].view(-1, 4), diagnostics["advantages"].float(), atol=1e-6)
        parameters = [p for p in model.parameters() if p.requires_grad]
        for g_got, g_ours in zip(torch.autograd.grad(got, parameters, retain_graph=True),
                                 torch.autograd.grad(expected, parameters, retain_graph=True)):
            assert torch.allclose(g_got, g_ours, atol=1e-6, rtol=1e-4)
        checked.append(((policy_logp.detach() - behavior_logp).abs().max().item(), rewards))
        return got

    monkeypatch.setattr(trainer, "_compute_loss", checked_loss)
    trainer.train()
    assert len(checked) == 3
    assert checked[0][0] < 1e-5 and checked[1][0] > 1e-4  # staleness 0, then 1: mu's log-probs are the old policy's
    assert any(0 < r.mean() < 1 for _, r in checked)
    assert any((p - s).abs().max() > 0 for p, s in zip(policy.parameters(), start))  # the weights moved
