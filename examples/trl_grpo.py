"""Our eq. 1 losses inside TRL's GRPOTrainer (tested with trl 1.16.0): a subclass that keeps TRL's sampling,
rewards and training loop and swaps its advantage and its loss for ours, imported from offpolicy_pessimism.py.

    python examples/trl_grpo.py --model MODEL_DIR --loss shifted --lag 4     # pmd and oapl: --loss pmd / oapl
    accelerate launch --num_processes 2 examples/trl_grpo.py --model MODEL_DIR --lag 4   # or torchrun

What maps onto what:
  - staleness: TRL samples once every `steps_per_generation` micro-batches and reuses the completions until the
    next sampling; with steps_per_generation = lag * gradient_accumulation_steps a generation serves `lag`
    optimizer steps, staleness 0 .. lag - 1, as `--lag` does in our loop;
  - mu's log-probs: `old_per_token_logps`, which TRL recomputes with a forward pass of the policy as it was when
    it sampled (our loop records them while sampling); when a generation starts every optimizer step (lag 1)
    TRL skips it and the policy's own log-probs, detached, are mu's;
  - beta: GRPOConfig.beta is TRL's KL weight (kept at 0 here); eq. 1's beta is `regression_beta`;
  - the advantage: ours, from the rewards of whole groups. TRL gathers every process's rewards before it slices
    out each process's rows; we compute our advantages on that gathered batch and keep this process's rows, so
    several processes give the advantages, the loss and (averaged) the gradient of one process;
  - sampling stays plain (temperature as given, no top_p, top_k, min_p, repetition penalty) or the
    log-probs are not those of the sampler.
TRL shuffles the rows of a generation before splitting it into micro-batches, so the group diagnostics of our
loop (regimes, mass leakage) are not computed here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import offpolicy_pessimism as op  # noqa: E402

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError:
    raise SystemExit("this recipe needs TRL: pip install trl==1.16.0") from None

LOSSES = ("shifted", "pmd", "oapl")
TESTED_TRL = ("1.16.0",)  # the recipe overrides TRL internals (_calculate_rewards, _compute_loss, ...)
# generation_kwargs that leave the sampled distribution alone; any other key may change it (or does)
PLAIN_GENERATION_KWARGS = ("use_cache", "cache_implementation", "cache_config", "disable_compile", "compile_config")


class RefusedSetting(ValueError):
    """A setting under which the recipe would not train with eq. 1 (main prints it as one line)."""


def check_trl_version(installed: str, allow_untested: bool) -> None:
    """The recipe relies on TRL's private methods and keys; another version may rename them silently."""
    if installed not in TESTED_TRL and not allow_untested:
        raise RefusedSetting(f"trl {installed} is installed, the recipe is tested with trl {', '.join(TESTED_TRL)}: "
                             "pip install trl==1.16.0, or allow_untested_trl=True (--allow-untested-trl) to try it")


@dataclass
class RatioFreeConfig(GRPOConfig):
    """GRPOConfig plus the ratio-free loss and its parameters (GRPOConfig.beta stays TRL's KL weight, 0)."""
    ratio_free_loss: str = field(default="shifted", metadata={"help": "eq. 1 loss: shifted, pmd or oapl"})
    regression_beta: float = field(default=0.1, metadata={"help": "eq. 1's beta"})
    beta_value: float = field(default=0.2, metadata={"help": "oapl: the soft value's beta_v"})
    shift: float = field(default=1.0, metadata={"help": "shifted: A = r - mean + shift * beta"})
    length_normalize: bool = field(default=False, metadata={"help": "divide sequence log-ratios by the length"})
    allow_untested_trl: bool = field(default=False, metadata={"help": "run with a trl other than the tested one"})
    disable_dropout: bool = field(default=True, metadata={"help": "must stay True: eq. 1 needs pi = mu at lag 0"})
    scale_rewards: str = field(default="none", metadata={"help": "must stay 'none': our advantages use raw rewards"})

    def __post_init__(self):
        """Refuse, before any model is loaded, the settings under which the loss would not be eq. 1."""
        check_trl_version(trl.__version__, self.allow_untested_trl)
        super().__post_init__()
        problems = settings_that_break_eq1(self)
        if problems:
            raise RefusedSetting("RatioFreeConfig: " + "; ".join(problems))


def settings_that_break_eq1(cfg: RatioFreeConfig) -> list[str]:
    """Why each refused setting is refused: eq. 1 needs mu's exact log-probs, pi = mu at staleness 0, and
    our advantage of the raw rewards."""
    extra_kwargs = sorted(set(cfg.generation_kwargs or {}) - set(PLAIN_GENERATION_KWARGS))
    checks = [
        (cfg.ratio_free_loss not in LOSSES, f"ratio_free_loss must be one of {', '.join(LOSSES)}"),
        (cfg.scale_rewards != "none", "scale_rewards must be 'none' (our advantages start from the raw rewards)"),
        (cfg.beta != 0, "beta (TRL's KL weight) must be 0: eq. 1's beta is regression_beta"),
        (cfg.top_p != 1 or bool(cfg.top_k), "sampling must be plain: top_p 1 and top_k 0"),
        (cfg.min_p is not None, "min_p must be unset: it truncates the sampler, so mu is not the policy"),
        (cfg.repetition_penalty != 1, "repetition_penalty must be 1: it reshapes the sampler, so mu is not the policy"),
        (bool(extra_kwargs), f"generation_kwargs may only hold {', '.join(PLAIN_GENERATION_KWARGS)}: "
                             f"{', '.join(extra_kwargs)} can change how tokens are sampled, so mu is not the policy"),
        (not cfg.disable_dropout, "disable_dropout must be True: with dropout pi's log-probs at staleness 0 are "
                                  "not mu's and log(pi/mu) is noise"),
        (cfg.num_iterations != 1, "num_iterations must be 1: staleness comes from steps_per_generation (our --lag), "
                                  "and num_iterations > 1 would reuse micro-batches the lag mapping does not count"),
        (cfg.use_vllm, "use_vllm is refused: vLLM samples from another copy of the policy and the recipe drops TRL's "
                       "importance_sampling_ratio correction"),
        (cfg.multi_objective_aggregation != "sum_then_normalize",
         "multi_objective_aggregation must be 'sum_then_normalize' (the plain weighted sum of the rewards)"),
    ]
    return [reason for broken, reason in checks if broken]


def dropout_settings(config) -> list[str]:
    """`name=value` for every non-zero *dropout* / *pdrop* number in a model config (nested ones too): TRL's
    disable_dropout zeroes nn.Dropout modules only, and some models apply attention dropout from the config."""
    found = []
    for key, value in config.to_dict().items() if hasattr(config, "to_dict") else config.items():
        if isinstance(value, dict):
            found += [f"{key}.{name}" for name in dropout_settings(value)]
        elif (("dropout" in str(key) or "pdrop" in str(key)) and isinstance(value, (int, float))
              and not isinstance(value, bool) and value != 0):
            found.append(f"{key}={value}")
    return found


def ratio_free_advantages(rewards: torch.Tensor, cfg: RatioFreeConfig) -> torch.Tensor:
    """A (groups, G) of our losses from the rewards (groups, G): shifted r - mean + shift * beta, pmd r - mean,
    oapl r - beta_v log mean exp(r / beta_v)."""
    if cfg.ratio_free_loss == "shifted":
        return op.shifted_mean_advantages(rewards, cfg.regression_beta, cfg.shift)
    if cfg.ratio_free_loss == "oapl":
        return rewards - op.soft_value(rewards, cfg.beta_value)
    return rewards - op.group_mean(rewards)


class RatioFreeGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with eq. 1's squared regression of beta * log(pi/mu) on our advantage."""

    def __init__(self, model, reward_funcs, args: RatioFreeConfig | None = None, **kwargs):
        if not isinstance(args, RatioFreeConfig):  # a GRPOConfig would fail later, at the first step, obscurely
            raise TypeError(f"RatioFreeGRPOTrainer needs args=RatioFreeConfig(...), got {type(args).__name__}: it "
                            "holds the loss's parameters and refuses the settings that break eq. 1")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name) is not None:  # their tokens are not sampled by the policy, yet enter the loss
                raise RefusedSetting(f"RatioFreeGRPOTrainer: {name} is refused (tokens the policy did not sample)")
        super().__init__(model, reward_funcs, args, **kwargs)
        found = dropout_settings(self.accelerator.unwrap_model(self.model).config)
        if found:
            raise RefusedSetting(f"the model's config has dropout on ({', '.join(found)}): set it to 0 (e.g. "
                                 "from_pretrained(..., attention_dropout=0.0)); with dropout log(pi/mu) is noise")
        self._gathered_rewards = None  # every process's rewards of the current generation, set by _calculate_rewards

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards, gathered across processes; kept so our advantages see every group whole."""
        self._gathered_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._gathered_rewards

    def _generate_and_score_completions(self, inputs):
        """TRL's batch with its advantages replaced by ours, computed on every process's rows (in group order)
        then sliced to this process's as TRL slices its own. A completion that got no reward (every reward
        function returned None, TRL's NaN) is refused: its group's baseline needs every reward."""
        output = super()._generate_and_score_completions(inputs)
        per_func, self._gathered_rewards = self._gathered_rewards, None
        rows = output["advantages"].size(0)
        if per_func is None or per_func.size(0) != rows * self.accelerator.num_processes:  # a TRL that changed
            raise RuntimeError("TRL's gathered rewards (from _calculate_rewards) do not cover every process's rows")
        unscored = torch.isnan(per_func).all(dim=1)
        if unscored.any():
            raise ValueError(f"{int(unscored.sum())} completion(s) got no reward (every reward function returned "
                             "None): eq. 1's baseline needs every reward of a group, so the recipe refuses them")
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)  # TRL's weighted sum
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        advantages = ratio_free_advantages(rewards.view(-1, group_size), self.args).flatten()
        mine = slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)
        output["advantages"] = advantages[mine].to(output["advantages"])
        return output

    def trl_records_old_logps(self) -> bool:
        """TRL's own condition (trl 1.16, _generate_and_score_completions; vLLM is refused) for computing
        `old_per_token_logps`: a generation does not start every optimizer step."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) != 0

    def _compute_loss(self, model, inputs):
        """eq. 1 on this micro-batch's rows: mean (beta * log(pi/mu)(y) - A(y))^2, with our sequence_sum and
        squared_regression; scaled for gradient accumulation as TRL scales its own losses."""
        if self.trl_records_old_logps() and "old_per_token_logps" not in inputs:
            raise RuntimeError("TRL computed no `old_per_token_logps` where its trl 1.16 condition says it does: "
                               f"mu's log-probs are missing (trl {trl.__version__}; inputs: {', '.join(inputs)})")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        policy_logp, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                    completion_ids.size(1))
        behavior_logp = inputs.get("old_per_token_logps")  # None when sampled this step: on-policy, mu = pi
        behavior_logp = policy_logp.detach() if behavior_logp is None else behavior_logp
        log_ratio = op.sequence_sum(policy_logp - behavior_logp, completion_mask.bool(), self.args.length_normalize)
        loss = op.squared_regression(log_ratio, inputs["advantages"], self.args.regression_beta)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["log_ratio_mean"].append(log_ratio.mean().item())  # dbar: 0 right after sampling
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)


def addition_dataset(count: int):
    """The built-in task's first `count` problems as a datasets.Dataset: a `prompt` and an `answer` column."""
    from datasets import Dataset

    problems = op.arithmetic_problems(200)[0]
    if count > len(problems):
        raise RefusedSetting(f"the built-in task has {len(problems)} training problems, {count} were asked for")
    return Dataset.from_dict({"prompt": [p for p, _ in problems[:count]], "answer": [a for _, a in problems[:count]]})


def prompts_to_train(steps: int, lag: int, prompts_per_step: int, available: int) -> int:
    """Distinct prompts for `steps` steps (each generation draws lag * prompts_per_step new ones), at most
    `available`; a generation larger than `available` is refused, naming the largest lag that fits."""
    if lag * prompts_per_step > available:
        raise RefusedSetting(f"--lag {lag}: a generation needs {lag * prompts_per_step} distinct prompts "
                             f"({prompts_per_step} per step), the built-in task has {available}; the largest lag "
                             f"is {available // prompts_per_step}")
    return min(math.ceil(steps / lag) * lag * prompts_per_step, available)


def addition_reward(completions, answer, **kwargs) -> list[float]:
    """TRL's reward function signature: our built-in task's reward per completion."""
    return [op.reward(completion, reference) for completion, reference in zip(completions, answer)]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="trl_grpo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved Hugging Face causal LM folder (or hub name); none: the built-in "
                                        "tiny model, untrained")
    parser.add_argument("--loss", default="shifted", choices=LOSSES)
    parser.add_argument("--lag", type=int, default=4, help="optimizer steps per generation")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--lr", type=float, help="learning rate (default: 1e-6 with --model, 1e-4 built-in)")
    parser.add_argument("--out", default="trl_runs", help="TRL's output_dir")
    parser.add_argument("--allow-untested-trl", action="store_true", help="run with a trl other than 1.16.0")
    args = parser.parse_args(argv)
    if args.lag < 1 or args.steps < 1:
        parser.error("--lag and --steps must be at least 1")
    return args


def recipe_config(args: argparse.Namespace) -> RatioFreeConfig:
    """The config main trains with: 16 rows (4 prompts x G=4) per process and step, lag = steps_per_generation."""
    lr = args.lr if args.lr is not None else (1e-6 if args.model else 1e-4)  # 1e-4 wrecks a pretrained model
    cuda = torch.cuda.is_available()
    return RatioFreeConfig(
        output_dir=args.out, ratio_free_loss=args.loss, max_steps=args.steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=1, steps_per_generation=args.lag, num_generations=4, max_completion_length=6,
        learning_rate=lr, lr_scheduler_type="constant", temperature=1.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),  # our loop's precision
        seed=1, allow_untested_trl=args.allow_untested_trl)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = recipe_config(args)
        per_step = (config.per_device_train_batch_size * config.world_size * config.gradient_accumulation_steps
                    // config.num_generations)
        count = prompts_to_train(args.steps, args.lag, per_step, len(op.arithmetic_problems(200)[0]))
        model, tokenizer = op.load_pretrained(args.model) if args.model else op.builtin_model()
        trainer = RatioFreeGRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=addition_reward,
                                       args=config, train_dataset=addition_dataset(count))
    except (op.UsageError, ValueError) as error:  # our refusals, TRL's config checks, a bad --model
        print(f"trl_grpo.py: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    trainer.train()
    for record in trainer.state.log_history if trainer.is_world_process_zero() else []:
        if "loss" in record:
            print({key: round(value, 4) for key, value in record.items()
                   if key in ("step", "loss", "reward", "log_ratio_mean", "grad_norm")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
