"""Our eq. 1 losses inside TRL's GRPOTrainer (written against trl 1.16): a subclass that keeps TRL's sampling,
rewards and training loop and swaps its advantage and its loss for ours, imported from offpolicy_pessimism.py.

    python examples/trl_grpo.py --model MODEL_DIR --loss shifted --lag 4     # pmd and oapl: --loss pmd / oapl

What maps onto what:
  - staleness: TRL samples once every `steps_per_generation` micro-batches and reuses the completions until the
    next sampling; with steps_per_generation = lag * gradient_accumulation_steps a generation serves `lag`
    optimizer steps, staleness 0 .. lag - 1, as `--lag` does in our loop;
  - mu's log-probs: `old_per_token_logps`, which TRL recomputes with a forward pass of the policy as it was when
    it sampled (our loop records them while sampling); at lag 1 TRL skips it and the policy's own log-probs,
    detached, are mu's;
  - beta: GRPOConfig.beta is TRL's KL weight (kept at 0 here); eq. 1's beta is `regression_beta`;
  - the advantage: TRL's with scale_rewards="none" is r - mean over the group, computed on whole groups before
    TRL shuffles the rows; every baseline of ours moves with the rewards (b(r + c) = b(r) + c), so our advantage
    functions applied to r - mean give exactly the A they give on r;
  - sampling stays plain (temperature as given, top_p 1, top_k 0) or the log-probs are not those of the sampler.
TRL shuffles the rows of a generation before splitting it into micro-batches, so the group diagnostics of our
loop (regimes, mass leakage) are not computed here.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import offpolicy_pessimism as op  # noqa: E402

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError:
    raise SystemExit("this recipe needs TRL: pip install trl==1.16.0") from None

LOSSES = ("shifted", "pmd", "oapl")


@dataclass
class RatioFreeConfig(GRPOConfig):
    """GRPOConfig plus the ratio-free loss and its parameters (GRPOConfig.beta stays TRL's KL weight, 0)."""
    ratio_free_loss: str = field(default="shifted", metadata={"help": "eq. 1 loss: shifted, pmd or oapl"})
    regression_beta: float = field(default=0.1, metadata={"help": "eq. 1's beta"})
    beta_value: float = field(default=0.2, metadata={"help": "oapl: the soft value's beta_v"})
    shift: float = field(default=1.0, metadata={"help": "shifted: A = r - mean + shift * beta"})
    length_normalize: bool = field(default=False, metadata={"help": "divide sequence log-ratios by the length"})

    def __post_init__(self):
        """Refuse, before any model is loaded, the settings under which the loss would not be eq. 1."""
        super().__post_init__()
        problems = [f"ratio_free_loss must be one of {', '.join(LOSSES)}"] if self.ratio_free_loss not in LOSSES else []
        problems += (["scale_rewards must be 'none' (TRL's advantage is then r - mean)"] if self.scale_rewards != "none"
                     else [])
        problems += ["beta (TRL's KL weight) must be 0: eq. 1's beta is regression_beta"] if self.beta != 0 else []
        problems += ["sampling must be plain: top_p 1 and top_k 0"] if self.top_p != 1 or self.top_k else []
        if problems:
            raise ValueError("RatioFreeConfig: " + "; ".join(problems))


def ratio_free_advantages(centred_rewards: torch.Tensor, cfg: RatioFreeConfig) -> torch.Tensor:
    """A (groups, G) of our losses from TRL's r - mean (groups, G): shifted r - mean + shift * beta, pmd
    r - mean, oapl r - beta_v log mean exp(r / beta_v); each is unchanged by a constant added to a group's r."""
    if cfg.ratio_free_loss == "shifted":
        return op.shifted_mean_advantages(centred_rewards, cfg.regression_beta, cfg.shift)
    if cfg.ratio_free_loss == "oapl":
        return centred_rewards - op.soft_value(centred_rewards, cfg.beta_value)
    return centred_rewards - op.group_mean(centred_rewards)


class RatioFreeGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with eq. 1's squared regression of beta * log(pi/mu) on our advantage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # args: a RatioFreeConfig, which has refused settings that break eq. 1
        if self.accelerator.num_processes > 1:
            raise ValueError("RatioFreeGRPOTrainer: one process (TRL may split a group across processes)")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)  # rows still in group order here
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        output["advantages"] = ratio_free_advantages(output["advantages"].view(-1, group_size), self.args).flatten()
        return output

    def _compute_loss(self, model, inputs):
        """eq. 1 on this micro-batch's rows: mean (beta * log(pi/mu)(y) - A(y))^2, with our sequence_sum and
        squared_regression; scaled for gradient accumulation as TRL scales its own losses."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        policy_logp, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                    completion_ids.size(1))
        behavior_logp = inputs.get("old_per_token_logps")  # None at lag 1: on-policy, mu = pi
        behavior_logp = policy_logp.detach() if behavior_logp is None else behavior_logp
        log_ratio = op.sequence_sum(policy_logp - behavior_logp, completion_mask.bool(), self.args.length_normalize)
        loss = op.squared_regression(log_ratio, inputs["advantages"], self.args.regression_beta)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["log_ratio_mean"].append(log_ratio.mean().item())  # dbar: 0 right after sampling
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)


def addition_dataset(count: int):
    """The built-in task's problems as a datasets.Dataset: a `prompt` and an `answer` column."""
    from datasets import Dataset

    problems = op.arithmetic_problems(200)[0][:count]
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "answer": [a for _, a in problems]})


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """TRL's reward function signature: our built-in task's reward per completion."""
    return [op.reward(completion, reference) for completion, reference in zip(completions, answer)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved Hugging Face causal LM folder (or hub name)")
    parser.add_argument("--loss", default="shifted", choices=LOSSES)
    parser.add_argument("--lag", type=int, default=4, help="optimizer steps per generation")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--out", default="trl_runs", help="TRL's output_dir")
    args = parser.parse_args(argv)
    if args.lag < 1 or args.steps < 1:
        parser.error("--lag and --steps must be at least 1")
    model, tokenizer = op.load_pretrained(args.model)
    config = RatioFreeConfig(
        output_dir=args.out, ratio_free_loss=args.loss, max_steps=args.steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, steps_per_generation=args.lag, num_generations=4, max_completion_length=6,
        learning_rate=1e-4, beta=0.0, scale_rewards="none", temperature=1.0, top_p=1.0, top_k=0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(), seed=1)
    trainer = RatioFreeGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=addition_reward,
                                   args=config, train_dataset=addition_dataset(512))
    trainer.train()
    for record in trainer.state.log_history:
        if "loss" in record:
            print({key: round(value, 4) for key, value in record.items()
                   if key in ("step", "loss", "reward", "log_ratio_mean", "grad_norm")})


if __name__ == "__main__":
    main()
