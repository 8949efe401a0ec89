"""Off-policy RL for LLM reasoning, in one file: a lagged generator, a reward checker, eight losses.

At scale, rollouts come from a *lagged* copy of the policy (the generator mu, refreshed from the
policy pi every `--lag` steps), so learning is off-policy. This script reproduces that on one GPU or
a laptop CPU and compares the objectives discussed in arXiv 2605.28150 ("Off-Policy Learning to
Reason Works Because It Is More Pessimistic Than You Think"): importance-weighted policy gradients
(`ppo`, `tis`), and the ratio-free ones, which weight no sample by pi/mu: REINFORCE (`reinforce`) and
squared regressions of a log-ratio on an advantage, beta * log(pi/mu) (`oapl`, `pmd`, `shifted`: the
paper's beta-shifted mean as we read it, and the control `centred`) or beta * log(pi/pi_ref) (`apo`).
With x a prompt, y one of its G completions, r in {0, 1} its reward:

    eq. 1   L(theta) = E_x E_{y ~ mu} [ (beta * log(pi(y)/mu(y)) - A(x, y))^2 ],   A = r - b(x)
    eq. 2   pi_c(y) = mu(y) * W(c * exp(A(y)/beta)) / c,   c chosen so that sum_y pi_c(y) = 1

eq. 2 is eq. 1's minimiser over distributions on a group's G samples, with mu the empirical distribution
(1/G on each sample; W: a real Lambert-W branch). c has the sign of log mean_y exp(A(y)/beta)
(`regime_shares` logs each sign's share of groups): c > 0 is the pessimistic regime, c = 0 the Boltzmann
target mu exp(A/beta) / Z, c < 0 the negative one. Once c * exp(max A / beta) would have to fall below
-1/e, the principal branch W0 cannot normalise; the minimiser then puts the sample with the largest A on
the other branch W_-1 and the target collapses onto it, usually with most of the mass. With a shared top
advantage it can collapse a little earlier, onto less (about 0.4 of the mass for 8 equal rewards), and
c < 0 alone is no collapse. `experiments/targets.py` solves eq. 2 exactly, with these numbers.

Part I, the algorithm, reads alone, in the order the data flows (after the flags, `Config`): task and
reward, the lagged generator (a plain decode loop on the KV cache), the policy's log-probs (a plain
forward), advantages, the losses (each with its equation), one RL step (sample, score, loss, backward in
micro-batches, AdamW step), its diagnostics, the training loop (which calls the appendix to start a run,
evaluate and write files). It is the code that runs; `--fast` swaps in one drop-in, on one visible line of
`prepare_models`: the update's `shared_prompt_logits` (a group's prompt computed once, not G times), with
`completion_logits`' signature; a test shows both compute the same. Below the line `# Appendix` is the
machinery: flags, loading and warm starts, the math-answer checker, the drop-in and memory,
starting and evaluating a run, run files and `main`. Experiments built on it live beside it:
`experiments/compare.py` (grids of losses x lags x seeds, tables, plots), `experiments/targets.py`
(eq. 2 solved exactly with Lambert's W, drawn for one group), `experiments/bench.py` (seconds per step,
tokens/s, memory, MFU, the largest micro-batch that fits), `experiments/curves.py` (a run's curves),
`experiments/checker_agreement.py` (the math checker against Math-Verify's own test cases).

What this file leaves out, on purpose:
  1. one optimizer step per sampled batch (no PPO epochs): pi/mu differs from 1 through the lag, and
     through rounding too: the generator decodes a token at a time from its KV cache while the policy runs
     whole sequences, and under bf16 the matmuls' inputs and outputs are rounded (the logits are upcast
     before the log-softmax) and the generator is stored in bf16 (`log_ratio_abs_mean` at staleness 0 is
     that floor: 7e-7 nats per completion in the default fp32 run, 0.016 in bf16 on a CPU);
  2. no KL-to-reference penalty (A*-PO is anchored on pi_ref through its loss, not through a penalty);
  3. no learning-rate schedule or warm-up: AdamW at a constant `--lr`, no weight decay;
  4. ppo and tis average over tokens, while the eq. 1 losses and reinforce sum log-probs over the
     completion, so one `--lr` means different step sizes for the two families;
  5. no vLLM or other inference server: the generator is a plain copy of the policy in the same process;
  6. one process on one device: for several GPUs, `examples/trl_grpo.py` runs these losses inside TRL;
  7. no value network or GAE: every baseline is computed from the group's own rewards.

`python offpolicy_pessimism.py` runs offline: built-in 2-digit additions and a tiny character-level Llama
it builds and warm-starts itself. `--model` loads any Hugging Face causal LM, `--task gsm8k|math|jsonl
--data FILE` a math data set. See README.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from tqdm import tqdm

LOSSES = ("ppo", "tis", "reinforce", "oapl", "apo", "pmd", "shifted", "centred")
TASKS = ("arith", "gsm8k", "math", "jsonl")
BUILTIN_WARM_START_STEPS = 600  # supervised steps that teach the built-in model the task's format before RL


# ----------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (`--prompts-per-step` for `prompts_per_step`), as in CleanRL's Args.
# ----------------------------------------------------------------------------------------------
def flag(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class Config:
    """Every flag: the algorithm's, then the task and model's, then speed, memory and files. Placeholder
    defaults (0, -1, auto) are resolved in one place, `resolve_defaults` (appendix)."""
    loss: str = flag("shifted", "objective; shifted is the paper's beta-shifted mean, as we read it", choices=LOSSES)
    lag: int = flag(16, "optimizer steps between generator refreshes (1 = on-policy)")
    steps: int = flag(300, "optimizer steps of RL")
    prompts_per_step: int = flag(16, "prompts per batch")
    group_size: int = flag(8, "completions sampled per prompt (G)")
    max_new_tokens: int = flag(0, "longest completion, in tokens (0: 6 for arith, 512 for the data tasks)")
    truncated: str = flag("zero", "completions cut at --max-new-tokens: reward 0, or masked out of the loss",
                          choices=("zero", "mask"))
    temperature: float = flag(1.0, "sampling temperature; log-probs use the same one")
    beta: float = flag(0.1, "regression temperature beta of eq. 1")
    beta_value: float = flag(0.2, "value temperature beta_v of the OAPL / A*-PO soft-value baseline")
    shift: float = flag(1.0, "shifted: A = r - mean + shift * beta")
    delta: float = flag(0.1, "reinforce (AsymRE): A = r - mean + delta, a baseline below the mean")
    clip_eps: float = flag(0.2, "ppo: clip the ratio to [1 - eps, 1 + eps]")
    is_cap: float = flag(2.0, "tis: truncate the importance ratio at this value")
    length_normalize: bool = flag(False, "reinforce and eq. 1 losses: divide sequence log-probs by the length")
    lr: float = flag(0.0, "AdamW learning rate (0: 1e-4 for the built-in model, 1e-6 with --model, TRL's default)")
    grad_clip: float = flag(1.0, "clip the gradient norm to this value")
    seed: int = flag(1, "seed for prompts and sampling")
    warm_start_steps: int = flag(-1, "supervised steps on correct answers before RL "
                                 f"(-1: {BUILTIN_WARM_START_STEPS} for the built-in model, 0 with --model)")
    eval_size: int = flag(200, "held-out problems for greedy accuracy")
    eval_every: int = flag(25, "evaluate (and checkpoint) every N steps")
    task: str = flag("arith", "built-in addition, or a JSONL data set given by --data", choices=TASKS)
    data: str = flag("", "JSONL training problems for --task gsm8k / math / jsonl")
    eval_data: str = flag("", "JSONL held-out problems (empty: hold out --eval-fraction of --data)")
    eval_fraction: float = flag(0.1, "share of --data held out for evaluation when --eval-data is not given")
    question_field: str = flag("", "JSONL field with the problem (empty: problem for --task math, else question)")
    answer_field: str = flag("answer", "JSONL field with the answer, a worked solution (#### / \\boxed{}) or "
                             "the bare answer")
    checker: str = flag("auto", "reward: arith (last number), math (our parser), math_verify (pip install "
                        "math-verify); auto = arith for --task arith, else math",
                        choices=("auto", "arith", "math", "math_verify"))
    model: str = flag("", "Hugging Face causal LM name or path (empty: the built-in tiny model)")
    plain_prompts: bool = flag(False, "--model: feed the raw prompt, not the tokenizer's chat template")
    trust_remote_code: bool = flag(False, "--model: allow the model's own code from the hub (off unless asked)")
    precision: str = flag("auto", "matmul precision: bf16 autocast (fp32 weights and log-softmax), or fp32; "
                          "auto = bf16 on a CUDA GPU that has it", choices=("auto", "fp32", "bf16"))
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    micro_batch: int = flag(0, "completions per forward/backward; gradients accumulate to the full batch's (0: the "
                            "whole batch; experiments/bench.py --activation-budget finds the most that fit)")
    fast: bool = flag(False, "the update runs a group's prompt once, not G times (shared_prompt_logits, the drop-in "
                      "for completion_logits; a test shows both compute the same)")
    out: str = flag("runs", "folder for run sub-folders and the cached warm start")
    device: str = flag("auto", "where to train", choices=("auto", "cpu", "cuda"))
    resume: bool = flag(False, "continue the run in its folder from its last checkpoint")


class UsageError(Exception):
    """Bad input: reported as one line before any work starts."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient: the run stops, its last good checkpoint stays."""


# ==============================================================================================
# Part I: the algorithm
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# Task and reward: 2-digit additions, and a reward that reads the completion's last number.
# ----------------------------------------------------------------------------------------------
def arithmetic_problems(eval_size: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All 3000 `a+b=` with a < 100 and b < 30, split into (train, held-out eval) with a fixed seed."""
    problems = [(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(30)]
    random.Random(0).shuffle(problems)
    return problems[eval_size:], problems[:eval_size]


def reward(completion: str, answer: str) -> float:
    """The built-in task's reward: 1.0 when the completion's last number has the answer's value (`46`, `046`,
    `=46`, `+46.0`), else 0.0; it parses, never executes. Data tasks: the math-answer checker (appendix)."""
    numbers = re.findall(r"[-+]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)", completion)
    return float(bool(numbers) and Fraction(numbers[-1]) == Fraction(answer))


# ----------------------------------------------------------------------------------------------
# Lagged generator: a frozen copy of the policy that samples groups and records behaviour log-probs.
# ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A batch of completions, prompt-major: row `i * G + j` is completion j of prompt i."""
    prompt_ids: torch.Tensor       # (N, P) left-padded
    prompt_mask: torch.Tensor      # (N, P) bool
    completion_ids: torch.Tensor   # (N, T) pad after the first EOS
    completion_mask: torch.Tensor  # (N, T) bool: True up to and including the first EOS
    behavior_logp: torch.Tensor    # (N, T) fp32 log mu(y_t | x, y_<t) under the sampling temperature
    truncated: torch.Tensor        # (N,) bool: no EOS within max_new_tokens
    staleness: int = 0             # optimizer steps since the generator that sampled it was refreshed

    def rows(self, part: slice) -> Rollout:
        """The rows `part` of every tensor (a micro-batch)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[part] for f in dataclasses.fields(self)
                                            if f.name != "staleness"})


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (N, max_len), real tokens at the right end of each row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = True
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def mask_from_lengths(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt: one user turn and the assistant header when the tokenizer has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return [tokenizer(p).input_ids for p in prompts]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]  # the template has its BOS


def new_kv_cache(model) -> tuple[str, object]:
    """An empty KV cache and the keyword the model takes it by (`cache` from transformers 5, `past_key_values`
    before); each forward appends its keys and values to it in place."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with_config = "config" in inspect.signature(DynamicCache.__init__).parameters  # per-layer cache types
    return name, DynamicCache(config=model.config) if with_config else DynamicCache()


def last_logits_only(model, count: int = 1) -> dict:
    """The keyword argument that limits the logits to the last `count` positions (none for a model
    without `logits_to_keep`, which then computes them all)."""
    return {"logits_to_keep": count} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def fixed_uniforms(key: str, rows: int, columns: int) -> torch.Tensor:
    """Uniforms in [0, 1) (rows, columns), float64 on the CPU, from a generator seeded by a hash of `key`
    ("seed|step"). Why not torch.multinomial: with fixed uniforms the draw is a function of the logits and the
    key alone, not of an RNG's state or the device's random stream, so a resumed run or a replayed step draws
    what the uninterrupted one drew from the same logits. Logits that differ by rounding (another device,
    another --micro-batch or --fast) can move a token across its uniform, and then the rest of that completion."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
    return torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def sample_completions(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, eos_id: int,
                       pad_id: int, uniforms: torch.Tensor | None, repeats: int = 1) -> Rollout:
    """Sample `repeats` completions per prompt (rows prompt-major) with the KV cache. Temperature 0 is greedy
    (uniforms None); else token t of row i is drawn from uniforms[i, t] (rows, >= max_new_tokens).

    Each prompt runs once, its keys and values copied to its `repeats` rows, then one token at a time until
    every row has ended. behavior_logp[t] = log_softmax(logits_t / temperature)[y_t] in fp32: exactly the
    distribution y_t was drawn from, so `policy_logp - behavior_logp` is the true per-token log-ratio."""
    device = next(model.parameters()).device
    unique_prompt, unique_mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))  # (prompts, P)
    cache_name, kv_cache = new_kv_cache(model)
    out = model(input_ids=unique_prompt, attention_mask=unique_mask.long(), position_ids=position_ids(unique_mask),
                use_cache=True, **{cache_name: kv_cache}, **last_logits_only(model))  # the last position predicts y_0
    kv_cache.batch_repeat_interleave(repeats)  # each prompt's keys and values, copied to its `repeats` rows
    logits = out.logits[:, -1].float().repeat_interleave(repeats, dim=0)  # (N, V), N = prompts * repeats
    prompt, prompt_mask = unique_prompt.repeat_interleave(repeats, 0), unique_mask.repeat_interleave(repeats, 0)
    attention_mask, next_position = prompt_mask, position_ids(prompt_mask)[:, -1:] + 1  # (N, P), (N, 1)
    uniforms = None if temperature == 0 else uniforms.to(device)
    rows = prompt.shape[0]
    tokens, logps = [], []  # one (N,) tensor per position
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)  # (N, V) fp32
        if temperature > 0:  # inverse CDF: the first token whose cumulative probability passes the uniform
            cdf = logp.exp().double().cumsum(-1)  # (N, V), summed in float64: exact enough for the rarest tokens
            token = torch.searchsorted(cdf, uniforms[:, t, None] * cdf[:, -1:], right=True).squeeze(-1)  # (N,)
        else:
            token = logits.argmax(-1)  # (N,)
        token_logp = logp.gather(-1, token[:, None]).squeeze(-1)  # (N,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(torch.where(finished, torch.zeros_like(token_logp), token_logp))
        just_ended = (token == eos_id) & ~finished
        lengths = torch.where(just_ended, torch.full_like(lengths, t + 1), lengths)
        finished |= just_ended
        if finished.all() or t == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)  # (N, P + t + 1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask.long(), position_ids=next_position,
                    use_cache=True, **{cache_name: kv_cache})  # appends each row's new keys and values to the cache
        logits = out.logits[:, -1].float()  # (N, V)
        next_position = next_position + 1
    completion_ids = torch.stack(tokens, dim=1)  # (N, T), T <= max_new_tokens
    completion_mask = mask_from_lengths(lengths, completion_ids.shape[1])
    behavior_logp = torch.stack(logps, dim=1) * completion_mask
    return Rollout(prompt, prompt_mask, completion_ids, completion_mask, behavior_logp, ~finished)


def sample_groups(generator, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
                  temperature: float, uniforms: torch.Tensor, staleness: int = 0) -> Rollout:
    """G completions per prompt from the (possibly stale) generator; the batch carries its staleness."""
    rollout = sample_completions(generator, encode_prompts(tokenizer, prompts), max_new_tokens, temperature,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, uniforms, group_size)
    rollout.staleness = staleness
    return rollout


def refresh_generator(generator, policy) -> None:
    """mu <- pi_theta: load_state_dict copies the weights into the generator's own tensors (in its dtype, no new
    allocation), after checking that both have the same names and shapes."""
    generator.load_state_dict(policy.state_dict())


def frozen_copy(model):
    """A copy with no gradients and no optimizer state: the generator mu, or the reference pi_ref."""
    return copy.deepcopy(model).requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# The policy's log-probs of the sampled completions, with the graph.
# ----------------------------------------------------------------------------------------------
def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Logits (N, T, V) at the positions that predict y_0 .. y_T-1, with the graph: one forward over each
    row's prompt and completion (y_T-1 is never an input). `shared_prompt_logits` (appendix) is the
    drop-in that runs a group's prompt once."""
    width = completion_ids.shape[1]
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    logits = model(input_ids=torch.cat([prompt_ids, completion_ids[:, :-1]], dim=1), attention_mask=mask.long(),
                   position_ids=position_ids(mask), **last_logits_only(model, width)).logits
    return logits[:, -width:] if logits.shape[1] > width else logits  # slice only when needed: its backward zero-fills


def completion_logprobs(model, rollout: Rollout, temperature: float, logits_of=completion_logits, chunk_rows: int = 8):
    """Per-token log pi(y_t | x, y_<t) (N, T) in fp32 with the graph, and the token entropy (N, T), detached.

    Columns that are padding in every row are dropped first, the logits come from `logits_of` (the plain
    `completion_logits` or its drop-in), and log pi(y_t) = logit(y_t) - logsumexp(logits) is taken
    chunk_rows rows at a time. That bounds the fp32 temporaries of the forward pass; the backward still
    keeps every chunk's fp32 logits, so the memory saved for it is the same at any chunk size.
    """
    first_prompt_column = int(rollout.prompt_mask.any(0).int().argmax())  # left padding in every row
    width = int(rollout.completion_mask.sum(-1).max())                     # right padding in every row
    completion_ids, completion_mask = rollout.completion_ids[:, :width], rollout.completion_mask[:, :width]
    logits = logits_of(model, rollout.prompt_ids[:, first_prompt_column:],
                       rollout.prompt_mask[:, first_prompt_column:], completion_ids, completion_mask)  # (N, width, V)
    token_logp, entropy = [], []  # (chunk_rows, width) each
    for chunk, chunk_ids in zip(logits.split(chunk_rows), completion_ids.split(chunk_rows)):
        chunk = chunk.float() / temperature
        log_normalizer = torch.logsumexp(chunk, dim=-1)
        token_logp.append(chunk.gather(-1, chunk_ids[..., None]).squeeze(-1) - log_normalizer)
        with torch.no_grad():
            entropy.append(log_normalizer - (torch.softmax(chunk, dim=-1) * chunk).sum(-1))
    padding = (0, rollout.completion_ids.shape[1] - width)  # back to (N, T)
    token_logp = F.pad(torch.cat(token_logp) * completion_mask, padding)
    return token_logp, F.pad(torch.cat(entropy) * completion_mask, padding)


# ----------------------------------------------------------------------------------------------
# Advantages: one small function per baseline. rewards: (groups, G); outputs broadcast to it.
# ----------------------------------------------------------------------------------------------
def group_mean(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.mean(-1, keepdim=True)


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_group = (r - mean) / (std + eps), the GRPO advantage (population std over the group)."""
    return (rewards - group_mean(rewards)) / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def soft_value(rewards: torch.Tensor, beta_value: float) -> torch.Tensor:
    """V = beta_v * log mean_j exp(r_j / beta_v): the mean as beta_v -> inf, the max as beta_v -> 0."""
    return beta_value * (torch.logsumexp(rewards / beta_value, -1, keepdim=True) - math.log(rewards.shape[-1]))


def shifted_mean_advantages(rewards: torch.Tensor, beta: float, shift: float = 1.0) -> torch.Tensor:
    """A = r - (mean - shift * beta): the paper's beta-shifted mean (our reading of it)."""
    return rewards - group_mean(rewards) + shift * beta


# ----------------------------------------------------------------------------------------------
# Losses. Token tensors are (N, T) with N = groups * G, prompt-major; rewards are (groups, G); mask (N, T) holds
# the tokens the loss sums over (`loss_mask`). Each returns (scalar loss, diagnostics); diagnostics["advantages"]
# is the (groups, G) advantage it used.
# ----------------------------------------------------------------------------------------------
def sequence_sum(token_values: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """sum_t over the completion (N,), or the mean over its tokens with length_normalize."""
    total = (token_values * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_normalize else total


def squared_regression(log_ratio: torch.Tensor, advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """eq. 1: mean over samples of (beta * log_ratio(y) - A(x, y))^2; both (groups, G)."""
    return ((beta * log_ratio - advantages) ** 2).mean()


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each completion's tokens, then over completions."""
    return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def ppo_loss(policy_logp, behavior_logp, mask, rewards, clip_eps: float = 0.2):
    """PPO/GRPO clip against the generator, no KL term:
    L = -mean_y mean_{t in y} min(ratio_t * A_group, clip(ratio_t, 1 - eps, 1 + eps) * A_group),
    ratio_t = exp(log pi(y_t) - log mu(y_t)) (the log-ratio clamped to +-20), A_group = (r - mean) / (std + eps).
    The ratio is against the generator mu, not the policy before this step: at staleness > 0 it starts away from 1,
    so the clip bounds the lag and the update together (CleanRL's PPO starts each update at ratio 1).
    """
    advantages = grpo_advantages(rewards)
    token_advantage = advantages.reshape(-1, 1)  # (N, 1)
    ratio = torch.exp((policy_logp - behavior_logp).clamp(-20, 20))
    objective = torch.minimum(ratio * token_advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * token_advantage)
    loss = -_token_mean(objective, mask)
    return loss, {**_ratio_stats(ratio, mask, (ratio - 1).abs() > clip_eps), "advantages": advantages}


def tis_loss(policy_logp, behavior_logp, mask, rewards, is_cap: float = 2.0):
    """Truncated importance-sampling policy gradient:
    L = -mean_y mean_{t in y} stopgrad(min(ratio_t, C)) * A_group * log pi(y_t).
    """
    advantages = grpo_advantages(rewards)
    ratio = torch.exp((policy_logp - behavior_logp).clamp(-20, 20)).detach()
    weight = ratio.clamp(max=is_cap)
    loss = -_token_mean(weight * advantages.reshape(-1, 1) * policy_logp, mask)
    return loss, {**_ratio_stats(ratio, mask, ratio > is_cap), "advantages": advantages}


def reinforce_loss(policy_logp, mask, rewards, delta: float = 0.1, length_normalize: bool = False):
    """Ratio-free off-policy REINFORCE with a baseline below the mean (AsymRE, arXiv 2506.20520):
    L = -mean_y (r - mean + delta) * sum_t log pi(y_t).
    """
    advantages = rewards - group_mean(rewards) + delta
    sequence_logp = sequence_sum(policy_logp, mask, length_normalize).view_as(rewards)
    return -(advantages * sequence_logp).mean(), {"advantages": advantages}


def oapl_loss(policy_logp, behavior_logp, mask, rewards, beta: float, beta_value: float,
              length_normalize: bool = False):
    """OAPL (arXiv 2602.19362), eq. 1 anchored on the generator with a soft-value baseline:
    L = mean (beta * log(pi/mu)(y) - (r - beta_v log mean_j exp(r_j / beta_v)))^2.
    On a group with unequal rewards beta_v > beta is the pessimistic regime, = beta the boundary, < beta the
    negative regime (equal rewards: the boundary). Yet Abar < 0 in every such group: the soft value is above the mean.
    """
    advantages = rewards - soft_value(rewards, beta_value)
    log_ratio = sequence_sum(policy_logp - behavior_logp, mask, length_normalize).view_as(rewards)
    return squared_regression(log_ratio, advantages, beta), {"advantages": advantages}


def apo_loss(policy_logp, ref_logp, mask, rewards, ref_value, beta: float,
             length_normalize: bool = False):
    """A*-PO (arXiv 2505.20686), eq. 1 with pi_ref in mu's place in the log-ratio (the samples still come from mu):
    L = mean (beta * log(pi/pi_ref)(y) - (r - V_ref))^2, with V_ref = beta_v log mean exp(r/beta_v)
    estimated once per prompt from pi_ref's own samples; ref_value: (groups, 1).
    """
    advantages = rewards - ref_value
    log_ratio = sequence_sum(policy_logp - ref_logp, mask, length_normalize).view_as(rewards)
    return squared_regression(log_ratio, advantages, beta), {"advantages": advantages}


def pmd_loss(policy_logp, behavior_logp, mask, rewards, beta: float, length_normalize: bool = False):
    """PMD-mean / Kimi k1.5 squared loss (arXiv 2602.05933), eq. 1 with the group-mean baseline:
    L = mean (beta * log(pi/mu)(y) - (r - mean_j r_j))^2. Never in the negative regime (Jensen).
    """
    advantages = rewards - group_mean(rewards)
    log_ratio = sequence_sum(policy_logp - behavior_logp, mask, length_normalize).view_as(rewards)
    return squared_regression(log_ratio, advantages, beta), {"advantages": advantages}


def shifted_loss(policy_logp, behavior_logp, mask, rewards, beta: float, shift: float = 1.0,
                 length_normalize: bool = False):
    """The paper's beta-shifted mean (as we read it), eq. 1 with the advantage r - mean + shift * beta:
    L = mean (beta * log(pi/mu)(y) - (r - mean_j r_j + shift * beta))^2.
    By Jensen E_mu exp(A/beta) >= e^shift: for shift > 0 every group is strictly pessimistic (c > 0);
    shift = 0 is pmd; a negative shift can put groups in the negative regime.
    """
    advantages = shifted_mean_advantages(rewards, beta, shift)
    log_ratio = sequence_sum(policy_logp - behavior_logp, mask, length_normalize).view_as(rewards)
    return squared_regression(log_ratio, advantages, beta), {"advantages": advantages}


def centred_loss(policy_logp, behavior_logp, mask, rewards, beta: float, length_normalize: bool = False):
    """The control: eq. 1 without its mean term (see `regression_split`), i.e. the baseline-free pairwise
    regression of REBEL (arXiv 2404.16767) in its centred form, d = log(pi/mu)(y):
    L = mean (beta * (d_i - mean_j d_j) - (r_i - mean_j r_j))^2.
    A constant added to a group's rewards or baseline cancels: no baseline, so no regime.
    """
    advantages = rewards - group_mean(rewards)
    log_ratio = sequence_sum(policy_logp - behavior_logp, mask, length_normalize).view_as(rewards)
    return squared_regression(log_ratio - group_mean(log_ratio), advantages, beta), {"advantages": advantages}


def _ratio_stats(ratio: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor) -> dict:
    ratio, clipped = ratio.detach()[mask], clipped[mask]
    if ratio.numel() == 0:  # every completion cut under --truncated mask: no token to measure
        return {"ratio_mean": math.nan, "ratio_max": math.nan, "clip_fraction": math.nan}
    return {"ratio_mean": ratio.mean().item(), "ratio_max": ratio.max().item(),
            "clip_fraction": clipped.float().mean().item()}


def loss_mask(on_truncation: str, rollout: Rollout) -> torch.Tensor:
    """The tokens the loss sums over (N, T): the completion's, none of a cut completion's with --truncated mask."""
    if on_truncation == "mask":
        return rollout.completion_mask & ~rollout.truncated[:, None]
    return rollout.completion_mask


def compute_loss(cfg: Config, policy_logp, rollout: Rollout, rewards, ref_logp=None, ref_value=None):
    """The loss chosen by --loss with its hyper-parameters. With --truncated mask, completions cut at
    --max-new-tokens carry no gradient (no tokens in the mask) but stay rows: in their group's baseline, in each
    mean over completions (an eq. 1 term (0 - A)^2), and, with log-ratio 0, in centred's group mean."""
    mask = loss_mask(cfg.truncated, rollout)  # (N, T) the tokens the loss sums over
    behavior_logp, length_normalize = rollout.behavior_logp, cfg.length_normalize
    if cfg.loss == "ppo":
        return ppo_loss(policy_logp, behavior_logp, mask, rewards, cfg.clip_eps)
    if cfg.loss == "tis":
        return tis_loss(policy_logp, behavior_logp, mask, rewards, cfg.is_cap)
    if cfg.loss == "reinforce":
        return reinforce_loss(policy_logp, mask, rewards, cfg.delta, length_normalize)
    if cfg.loss == "oapl":
        return oapl_loss(policy_logp, behavior_logp, mask, rewards, cfg.beta, cfg.beta_value, length_normalize)
    if cfg.loss == "apo":
        return apo_loss(policy_logp, ref_logp, mask, rewards, ref_value, cfg.beta, length_normalize)
    if cfg.loss == "pmd":
        return pmd_loss(policy_logp, behavior_logp, mask, rewards, cfg.beta, length_normalize)
    if cfg.loss == "shifted":
        return shifted_loss(policy_logp, behavior_logp, mask, rewards, cfg.beta, cfg.shift, length_normalize)
    if cfg.loss == "centred":
        return centred_loss(policy_logp, behavior_logp, mask, rewards, cfg.beta, length_normalize)
    raise ValueError(f"unknown loss {cfg.loss!r}; choose from {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------------------
# One RL step: sample G completions per prompt from the (possibly stale) generator, score them, compute
# the loss and its gradient (in micro-batches), and take an AdamW step.
# ----------------------------------------------------------------------------------------------
def completion_texts(tokenizer, rollout: Rollout) -> list[str]:
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def score(tokenizer, rollout: Rollout, answers: list[str], group_size: int, checker=reward,
          zero_truncated: bool = False) -> torch.Tensor:
    """Rewards (groups, G) for a rollout whose prompts were repeated G times, answers one per prompt.

    zero_truncated: a completion cut at max_new_tokens gets 0 whatever it says (--truncated zero).
    """
    texts = completion_texts(tokenizer, rollout)
    rewards = [checker(text, answers[row // group_size]) for row, text in enumerate(texts)]
    rewards = torch.tensor(rewards, device=rollout.completion_ids.device)
    if zero_truncated:
        rewards = rewards.masked_fill(rollout.truncated, 0.0)
    return rewards.view(-1, group_size)


@dataclass
class ModelsAndOptimizer:
    policy: torch.nn.Module            # pi_theta, fp32 weights
    generator: torch.nn.Module         # mu: a frozen copy, refreshed every `lag` steps
    reference: torch.nn.Module | None  # pi_ref, the policy as RL started (A*-PO only)
    optimizer: torch.optim.Optimizer
    precision: str                          # fp32, or bf16 autocast
    logits_of: object = completion_logits    # the update's completion logits: the plain forward, or its drop-in


def prepare_models(cfg: Config, policy, tokenizer, device: torch.device, precision: str) -> ModelsAndOptimizer:
    """The policy on its device in eval mode (no dropout: the generator and the policy must compute the
    same log-probs), its generator mu, the reference pi_ref (A*-PO only) and the optimizer. With bf16 the
    copies are stored in bf16 (half the memory): autocast rounds only what goes through a matmul, so a copy's
    norms and embeddings are rounded where the policy's are not, and pi/mu is not exactly 1 right after a refresh
    (`log_ratio_abs_mean` at staleness 0 measures it)."""
    policy.to(device).eval()
    copy_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = frozen_copy(policy).to(copy_dtype)
    reference = frozen_copy(policy).to(copy_dtype) if cfg.loss == "apo" else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    models = ModelsAndOptimizer(policy, generator, reference, optimizer, precision)
    if cfg.fast:  # the faster drop-in (appendix): completion_logits' signature and numbers, a group's prompt run once
        models.logits_of = shared_prompt_logits
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(policy)
    return models


def autocast(device: torch.device, precision: str):
    """bf16 autocast: matmuls run in bf16, inputs and outputs (the weights stay fp32; the logits are upcast, and
    log-softmax and losses run in fp32), or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def reference_values(reference, tokenizer, batch, values: dict, cfg: Config, checker=reward) -> torch.Tensor:
    """A*-PO's V_ref per prompt (groups, 1): soft value of G rewards sampled once from pi_ref (seeded by the
    prompt, so V_ref does not depend on when it is first needed, up to rounding: a prompt's padding depends on
    the prompts sampled with it), then kept in `values` {prompt: V_ref}."""
    new = [(p, a) for p, a in dict(batch).items() if p not in values]
    if new:
        uniforms = torch.cat([fixed_uniforms(f"{cfg.seed}|reference|{p}", cfg.group_size, cfg.max_new_tokens)
                              for p, _ in new])
        rollout = sample_groups(reference, tokenizer, [p for p, _ in new], cfg.group_size, cfg.max_new_tokens,
                                cfg.temperature, uniforms)
        rewards = score(tokenizer, rollout, [a for _, a in new], cfg.group_size, checker,
                        zero_truncated=cfg.truncated == "zero")  # (new prompts, G)
        values.update({p: v for (p, _), v in zip(new, soft_value(rewards, cfg.beta_value).squeeze(-1).tolist())})
    device = next(reference.parameters()).device
    return torch.tensor([values[p] for p, _ in batch], device=device)[:, None]


def micro_batches(rows: int, micro_batch: int) -> list[slice]:
    """Row slices of at most micro_batch rows (0: one slice with every row)."""
    size = micro_batch if 0 < micro_batch < rows else rows
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def backward_in_micro_batches(policy, rollout: Rollout, temperature: float, micro_batch: int, loss_of,
                              precision: str = "fp32", logits_of=completion_logits):
    """loss.backward() for loss = loss_of(policy_logp), one micro-batch of rows at a time.

    Why the gradient is the full batch's: each loss here is a mean over completions of a term that depends
    on that completion's log-probs alone (the advantages on the rewards alone), except centred's, which
    depends on its whole group's, so centred takes micro-batches of whole groups. Each pass computes the
    full-batch loss with this micro-batch's log-probs carrying the graph and constants in the other rows
    (earlier rows their detached values, later rows zeros): by the chain rule its gradient is this
    micro-batch's share, dL/dlogp_part * dlogp_part/dtheta, whatever those constants are, since the other
    rows' terms do not touch these rows. The shares add up to the full gradient with no rescaling, and only
    one micro-batch's activations are alive at a time. Returns the full batch's (loss, diagnostics) and the
    detached (policy_logp, entropy), both (N, T).
    """
    device = rollout.completion_ids.device
    policy_logp, entropy = torch.zeros_like(rollout.behavior_logp), torch.zeros_like(rollout.behavior_logp)  # (N, T)
    for part in micro_batches(rollout.completion_ids.shape[0], micro_batch):
        with autocast(device, precision):
            part_logp, entropy[part] = completion_logprobs(policy, rollout.rows(part), temperature, logits_of)
        with_graph = torch.cat([policy_logp[:part.start], part_logp, policy_logp[part.stop:]])  # (N, T)
        loss, _ = loss_of(with_graph)
        loss.backward()
        policy_logp[part] = part_logp.detach()
    loss, diagnostics = loss_of(policy_logp)
    return loss, diagnostics, policy_logp, entropy


@dataclass
class StepResult:
    rollout: Rollout
    rewards: torch.Tensor      # (groups, G)
    loss: torch.Tensor         # the full-batch loss, detached
    diagnostics: dict
    policy_logp: torch.Tensor  # (N, T) detached: the policy before the update
    entropy: torch.Tensor      # (N, T)
    grad_norm: torch.Tensor    # before clipping
    ref_logp: torch.Tensor | None = None   # A*-PO: (N, T) log pi_ref
    ref_value: torch.Tensor | None = None  # A*-PO: (groups, 1) V_ref


def rl_step(cfg: Config, models: ModelsAndOptimizer, tokenizer, batch: list[tuple[str, str]], staleness: int,
            uniforms: torch.Tensor, ref_values: dict, checker=reward) -> StepResult:
    """One optimizer step: G completions per prompt from the generator (which the loop refreshes every `lag`
    steps; staleness counts the steps since), rewards, loss, backward, AdamW. uniforms: (prompts * G, T max)."""
    policy, optimizer, precision = models.policy, models.optimizer, models.precision
    device = next(policy.parameters()).device
    # 1. sample: G completions per prompt from the generator mu, N = prompts * G rows, with log mu per token
    #    (A*-PO also samples pi_ref once per new prompt, for its baseline V_ref)
    with autocast(device, precision):
        rollout = sample_groups(models.generator, tokenizer, [p for p, _ in batch], cfg.group_size,
                                cfg.max_new_tokens, cfg.temperature, uniforms, staleness)
        ref_value = None if models.reference is None else reference_values(  # (groups, 1)
            models.reference, tokenizer, batch, ref_values, cfg, checker)
    # 2. score: a reward per completion
    rewards = score(tokenizer, rollout, [a for _, a in batch], cfg.group_size, checker,
                    zero_truncated=cfg.truncated == "zero")  # (groups, G)
    # 3. the loss's other inputs: the micro-batch size, and A*-PO's log pi_ref
    micro_batch = cfg.micro_batch
    if cfg.loss == "centred" and micro_batch:  # its loss couples a group's completions: micro-batches of whole groups
        micro_batch = math.ceil(micro_batch / cfg.group_size) * cfg.group_size
    ref_logp = None
    if models.reference is not None:  # A*-PO's log pi_ref, the only extra pass (log mu was recorded while sampling)
        with torch.no_grad(), autocast(device, precision):
            ref_logp = torch.cat([completion_logprobs(models.reference, rollout.rows(part), cfg.temperature,
                                                      models.logits_of)[0]
                                  for part in micro_batches(rollout.completion_ids.shape[0], micro_batch)])  # (N, T)
    # 4. loss and backward, a micro-batch of rows at a time (the gradient is the full batch's)
    optimizer.zero_grad(set_to_none=True)
    loss, diagnostics, policy_logp, entropy = backward_in_micro_batches(
        policy, rollout, cfg.temperature, micro_batch,
        lambda logp: compute_loss(cfg, logp, rollout, rewards, ref_logp, ref_value), precision, models.logits_of)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss.item()}")
    # 5. step: clip the gradient's norm, then AdamW
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {grad_norm.item()}")
    optimizer.step()
    return StepResult(rollout, rewards, loss.detach(), diagnostics, policy_logp, entropy, grad_norm, ref_logp,
                      ref_value)


# ----------------------------------------------------------------------------------------------
# Diagnostics: the split of eq. 1 into a centred part and a mean term, mass leakage, the regime of eq. 2's target
# per group, and the metrics line of a step.
# ----------------------------------------------------------------------------------------------
def regression_split(log_ratio: torch.Tensor, advantages: torch.Tensor, beta: float):
    """eq. 1 on each group splits exactly into a centred part and a mean term (README, "The math"),
    mean_i (beta d_i - A_i)^2 = mean_i (beta (d_i - dbar) - (A_i - Abar))^2 + (beta dbar - Abar)^2;
    both averaged over groups, as the losses are. (groups, G) in, two scalars out."""
    log_ratio_mean, advantage_mean = group_mean(log_ratio), group_mean(advantages)
    centred = ((beta * (log_ratio - log_ratio_mean) - (advantages - advantage_mean)) ** 2).mean()
    return centred, ((beta * log_ratio_mean - advantage_mean) ** 2).mean()


def mass_leakage(policy_sequence_logp: torch.Tensor, behavior_sequence_logp: torch.Tensor,
                 completion_ids: torch.Tensor, completion_mask: torch.Tensor, group_size: int) -> dict:
    """sum_i pi(y_i) / sum_i mu(y_i) over each group's distinct completions, averaged over groups.

    Below 1: the policy moved mass onto completions nobody sampled. Also the generator's own mass on
    its distinct samples, which shows how much of mu a group of G samples covers.
    """
    ratios, covered = [], []
    for start in range(0, completion_ids.shape[0], group_size):
        distinct = {}
        for row in range(start, start + group_size):
            key = tuple(completion_ids[row][completion_mask[row]].tolist())
            distinct.setdefault(key, row)
        rows = torch.tensor(list(distinct.values()))
        policy_mass = torch.logsumexp(policy_sequence_logp[rows].double(), 0)
        generator_mass = torch.logsumexp(behavior_sequence_logp[rows].double(), 0)
        ratios.append((policy_mass - generator_mass).exp().item())
        covered.append(generator_mass.exp().item())
    return {"mass_leakage": sum(ratios) / len(ratios), "generator_mass_sampled": sum(covered) / len(covered)}


def regime_shares(advantages: torch.Tensor, beta: float) -> dict:
    """Share of groups in each regime of eq. 2, pi_c(y) = mu(y) W(c exp(A(y)/beta)) / c, eq. 1's minimiser over
    distributions on the group's G samples with the empirical mu (1/G on each): c > 0 (pessimistic), c = 0 (the
    Boltzmann target mu exp(A/beta) / Z), c < 0 (negative, collapsed or not). Only the sign of c, which needs no W:
    `induced_target` in experiments/targets.py solves for c and the target. advantages: (groups, G).

    c has the sign of log mean_i exp(A_i/beta). With z_i = exp(A_i/beta), the target's total mass is
    mean_i z_i W(c z_i) / (c z_i). For c > 0 only the branch W0 is real, and W0(x) / x = exp(-W0(x)) decreases
    from 1 at x -> 0: the mass falls from mean_i z_i as c grows from 0, so it reaches 1 at some c > 0 exactly when
    mean_i z_i > 1. c -> 0 gives pi = mu exp(A/beta), a distribution exactly when mean_i z_i = 1 (the Boltzmann
    target, Z = 1). Otherwise c < 0 (on W0, or collapsed with one sample on W_-1: either way c z_i < 0).

    The sign is taken in float64, but A arrives with the round-off of its own dtype (float32 in a run): pmd on
    equal rewards gives A = 0 and oapl with beta_v = beta gives mean_i z_i = 1 only up to it (exactly, for pmd on
    rewards 0 and 1). So c = 0 means |log mean_i z_i| <= 16 eps ((1 + max_i |A_i|) / beta + log G), eps the
    precision of A's dtype: what rounding A = r - b (and b's log G) moves the log-mean by, 16 times over, for
    rewards of order 1 (a test checks both cases in float32 and float64, beta 1e-3 to 10)."""
    scaled = advantages.double() / beta                                                 # (groups, G) A/beta
    size = scaled.shape[-1]
    log_mean_exp = torch.logsumexp(scaled, -1) - math.log(size)                         # (groups,) log mean_i z_i
    round_off = 16 * torch.finfo(advantages.dtype).eps * (
        (1 + advantages.double().abs().amax(-1)) / beta + math.log(size))               # (groups,)
    positive, negative = log_mean_exp > round_off, log_mean_exp < -round_off
    return {"regime_positive": positive.double().mean().item(),
            "regime_boundary": (~positive & ~negative).double().mean().item(),
            "regime_negative": negative.double().mean().item()}


def step_metrics(cfg: Config, step: int, result: StepResult) -> dict:
    """One line of metrics.jsonl (README, "Reading metrics.jsonl"): the batch as the policy saw it
    before the update, the loss's own diagnostics, the regime and mean-term diagnostics. The regimes
    are those of eq. 2 on the G samples from mu, so apo (anchored on pi_ref) has none. `log_step` adds the
    timing and, at an evaluation, the greedy accuracy measured after the update."""
    rollout, rewards, mask = result.rollout, result.rewards, result.rollout.completion_mask  # (groups, G), (N, T)
    advantages = result.diagnostics["advantages"].detach()                                   # (groups, G)
    policy_sequence_logp = sequence_sum(result.policy_logp, mask)                            # (N,)
    behavior_sequence_logp = sequence_sum(rollout.behavior_logp, mask)                       # (N,)
    token_log_ratio = (result.policy_logp - rollout.behavior_logp)[mask]                     # (tokens,)
    sequence_log_ratio = policy_sequence_logp - behavior_sequence_logp  # (N,) d_i = log pi/mu of each completion
    tokens = int(mask.sum())
    record = {
        "step": step, "staleness": rollout.staleness, "loss": result.loss.item(), "reward_mean": rewards.mean().item(),
        "advantage_mean": advantages.mean().item(), "grad_norm": result.grad_norm.item(),
        "entropy": result.entropy[mask].mean().item(), "completion_length": tokens / mask.shape[0],
        "log_ratio_mean": sequence_log_ratio.mean().item(),
        "log_ratio_abs_mean": sequence_log_ratio.abs().mean().item(),  # at staleness 0: the rounding floor
        # KL(mu || pi) per token by the k3 estimator on mu's samples (CleanRL's approx_kl), then per completion
        "kl_generator_policy": (token_log_ratio.exp() - 1 - token_log_ratio).mean().item(),
        "kl_sequence": (sequence_log_ratio.clamp(max=20).exp() - 1 - sequence_log_ratio).mean().item(),
        "equal_reward_groups": (rewards == rewards[:, :1]).all(-1).float().mean().item(),
        **mass_leakage(policy_sequence_logp, behavior_sequence_logp, rollout.completion_ids, mask, cfg.group_size),
        **{key: value for key, value in result.diagnostics.items() if key != "advantages"},
    }
    if cfg.loss in ("oapl", "pmd", "shifted"):  # anchored on mu, a baseline per group (apo's anchor is pi_ref)
        record.update(regime_shares(advantages, cfg.beta))
        # (N,) the log-ratios the loss regressed, on its own mask: the two parts sum to the loss
        loss_log_ratio = sequence_sum(result.policy_logp - rollout.behavior_logp, loss_mask(cfg.truncated, rollout),
                                      cfg.length_normalize)
        centred, mean_term = regression_split(loss_log_ratio.view_as(rewards), advantages, cfg.beta)
        record.update(mean_term_target=(group_mean(advantages) / cfg.beta).mean().item(),
                      loss_centred=centred.item(), loss_mean_term=mean_term.item())
    record.update(truncated_fraction=rollout.truncated.float().mean().item())
    return record


# ----------------------------------------------------------------------------------------------
# Training loop: start (or resume: `start_run`, appendix), then every step refresh-or-not, sample, score, update,
# log; greedy accuracy (`accuracy`, appendix) every --eval-every steps.
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, problems: tuple[list, list] | None = None, quiet: bool = False) -> dict:
    """One run, from its warm start or its last checkpoint to --steps; returns summary.json's contents."""
    cfg = resolve_defaults(cfg)  # a Config() built in Python: its placeholders resolved, as the command line's are
    run, start_step = start_run(cfg, problems)  # no torch.manual_seed: nothing draws from torch's global RNG
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc=os.path.basename(run.folder.path), initial=start_step,
               total=cfg.steps, dynamic_ncols=True, disable=quiet)
    for step in bar:
        # 1. the generator is refreshed from the policy every `lag` steps (staleness 0), stale in between;
        # 2. it samples, the completions are scored, the policy is updated
        staleness = (step - 1) % cfg.lag
        if staleness == 0:
            refresh_generator(run.models.generator, run.models.policy)  # mu <- pi
        batch = run.prompt_rng.sample(run.train_problems, cfg.prompts_per_step)
        uniforms = fixed_uniforms(f"{cfg.seed}|{step}", len(batch) * cfg.group_size, cfg.max_new_tokens)
        try:
            result = rl_step(cfg, run.models, run.tokenizer, batch, staleness, uniforms, run.ref_values, run.checker)
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error} at step {step}; the last good checkpoint stays in "
                                   f"{run.folder.checkpoint}")
        step_accuracy = accuracy(run) if step % cfg.eval_every == 0 or step == cfg.steps else None
        # 3. the step's metrics, on the batch as the policy saw it before the update (log_step adds the timing)
        record = step_metrics(cfg, step, result)
        log_step(run, step, batch, result, record, step_accuracy)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", eval=f"{run.evals[-1]:.3f}", stale=staleness)
    bar.close()
    return run.folder.write_summary(run)


# ==============================================================================================
# Appendix: the machinery. Part I calls it by name; each part says why it is here.
# ==============================================================================================
# ----------------------------------------------------------------------------------------------
# Flags: parse the command line, resolve placeholder defaults, refuse what cannot work before any work.
# ----------------------------------------------------------------------------------------------
def parse_config(argv: list[str] | None = None, config_class=Config, description: str | None = None):
    """The flags of `config_class` (Config, or an experiment's subclass of it), defaults resolved."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    for f in dataclasses.fields(config_class):
        name = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(name, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(name, type=type(f.default), default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    return resolve_defaults(config_class(**vars(parser.parse_args(argv))))


def resolve_defaults(cfg: Config) -> Config:
    """Every placeholder default, resolved in this one place (config.json records it). Left to the machine:
    --device / --precision auto (`device_and_precision`)."""
    data_task = cfg.task != "arith"
    return dataclasses.replace(
        cfg,
        max_new_tokens=cfg.max_new_tokens if cfg.max_new_tokens != 0 else (512 if data_task else 6),
        question_field=cfg.question_field or ("problem" if cfg.task == "math" else "question"),
        lr=cfg.lr if cfg.lr != 0 else (1e-6 if cfg.model else 1e-4),  # 1e-4 wrecks a pretrained model
        warm_start_steps=cfg.warm_start_steps if cfg.warm_start_steps != -1 else (
            0 if cfg.model else BUILTIN_WARM_START_STEPS),
        checker=cfg.checker if cfg.checker != "auto" else ("math" if data_task else "arith"))


def check_config(cfg: Config, one_run: bool = True) -> None:
    """Raise UsageError for any setting that cannot work, before anything is loaded or built. one_run: a run
    of its own (not an experiment's cell), whose folder must be new, or hold a checkpoint for --resume."""
    at_least = {"lag": 1, "steps": 1, "prompts_per_step": 1, "group_size": 2, "max_new_tokens": 1,
                "eval_size": 1, "eval_every": 1, "warm_start_steps": 0, "micro_batch": 0}
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    for name in ("temperature", "beta", "beta_value", "is_cap", "lr", "grad_clip"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.clip_eps < 1:
        raise UsageError(f"--clip-eps must be in (0, 1), got {cfg.clip_eps}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if (cfg.precision == "bf16" and cfg.device != "cpu" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise UsageError("--precision bf16: this GPU has no bf16; use --precision fp32")
    if cfg.model and not os.path.isdir(cfg.model) and cfg.model.startswith((".", "/", "~")):
        raise UsageError(f"--model {cfg.model}: no such directory; give a saved model folder or a hub name")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a folder; give a folder (it is made if missing)")
    if cfg.task == "arith" and (cfg.data or cfg.eval_data):
        raise UsageError("--data and --eval-data are for --task gsm8k, math or jsonl; the arith task is built in")
    if cfg.task != "arith":
        if not cfg.data:
            raise UsageError(f"--task {cfg.task} needs --data FILE.jsonl")
        if not cfg.model:
            raise UsageError(f"--task {cfg.task} needs --model: the built-in tiny model only reads digits and + =")
        for path in (cfg.data, cfg.eval_data):
            if path and not os.path.isfile(path):
                raise UsageError(f"{path}: no such file")
        if not (cfg.eval_data or 0 < cfg.eval_fraction < 1):
            raise UsageError(f"--eval-fraction must be in (0, 1), got {cfg.eval_fraction}")
    if cfg.checker == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise UsageError("--checker math_verify needs the math_verify package: pip install math-verify")
    if one_run:
        RunFolder(cfg).check_start(cfg.resume)


def device_and_precision(cfg: Config) -> tuple[torch.device, str]:
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else (
        "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    return device, precision


# ----------------------------------------------------------------------------------------------
# Loading: HF models and tokenizers, the warm start and its cache, where a run runs.
# ----------------------------------------------------------------------------------------------
def load_pretrained(name_or_path: str, trust_remote_code: bool = False, plain_prompts: bool = False):
    """Any HF causal LM and its tokenizer through `from_pretrained`, fp32 weights (the master copy).
    Completions end at the tokenizer's EOS (a chat model's end of turn); pad = EOS when there is no pad
    token. plain_prompts drops the chat template, so prompts are fed as raw text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--model {name_or_path}: could not load it ({first_line})") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"--model {name_or_path}: its tokenizer has no EOS token, which ends completions")
    not_finite = [name for name, weight in model.named_parameters() if not torch.isfinite(weight).all()]
    if not_finite:  # its probabilities would be NaN: sampling would fail deep inside, so say it here
        raise UsageError(f"--model {name_or_path}: {len(not_finite)} weight tensors hold NaN or inf (first: "
                         f"{not_finite[0]}); the model cannot be sampled from")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks come from lengths, so pad == EOS is safe
    if plain_prompts:
        tokenizer.chat_template = None
    return model, tokenizer


def build_char_tokenizer():
    """A character-level tokenizer for the arithmetic task, as a real `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # installed with transformers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate("0123456789+-=#., ")})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def build_tiny_model(tokenizer, seed: int = 0):
    """A 4-layer, 64-wide Llama (about 0.26M parameters) initialised with a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def builtin_model():
    tokenizer = build_char_tokenizer()
    return build_tiny_model(tokenizer), tokenizer


def warm_start(model, tokenizer, problems, steps: int, device, batch_size: int = 64, lr: float = 3e-3) -> None:
    """Supervised fine-tuning on `prompt + answer + EOS`, the loss on answer tokens only (seed 0)."""
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(steps), desc="warm start", leave=False):
        batch = rng.sample(problems, batch_size) if len(problems) >= batch_size else rng.choices(problems, k=batch_size)
        prompt_ids = encode_prompts(tokenizer, [p for p, _ in batch])
        answer_ids = [tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for _, a in batch]
        width = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            input_ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p): len(p) + len(a)] = torch.tensor(a)
        attention_mask = (labels != -100) | (torch.arange(width) < torch.tensor([len(p) for p in prompt_ids])[:, None])
        loss = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def load_model(cfg: Config, train_problems, device, say_where_it_runs: bool = False):
    """The policy at the start of RL (also A*-PO's reference), its tokenizer and source: --model (or the
    built-in model) after --warm-start-steps supervised steps, cached in --out; say_where_it_runs: print
    the run's first line once the model is loaded, before any warm start."""
    loaded = print_where_it_runs if say_where_it_runs else lambda cfg, model, source: None
    source, steps = cfg.model or "builtin-tiny-llama", cfg.warm_start_steps
    cache_dir = warm_start_folder(cfg, source, steps)
    if steps and os.path.isdir(cache_dir):
        try:
            model, tokenizer = load_pretrained(cache_dir, cfg.trust_remote_code, cfg.plain_prompts)
        except Exception as error:  # cut short or edited by hand: say so, and leave it as it is
            raise UsageError(f"the cached warm start {cache_dir} cannot be read ({str(error)[:300]}); delete "
                             f"that folder and run again to rebuild it") from None
        loaded(cfg, model, cache_dir)
        return model, tokenizer, cache_dir
    model, tokenizer = load_pretrained(cfg.model, cfg.trust_remote_code, cfg.plain_prompts) if cfg.model \
        else builtin_model()
    loaded(cfg, model, source)
    if steps == 0:
        return model, tokenizer, source
    model.to(device)
    started = time.time()
    warm_start(model, tokenizer, train_problems, steps, device)
    saved = save_model_atomically(model, tokenizer, cache_dir)  # a half-written warm start is never picked up
    tqdm.write(f"warm start: {steps} supervised steps in {time.time() - started:.0f}s, " +
               (f"cached in {cache_dir}" if saved else f"the same as the one another process cached in {cache_dir}"))
    return model, tokenizer, cache_dir


def warm_start_folder(cfg: Config, source: str, steps: int) -> str:
    """Where the warm start of this model, task and step count is cached under --out."""
    key = f"{os.path.abspath(cfg.model) if cfg.model else source}|{steps}"
    if cfg.task != "arith":
        key += f"|{cfg.task}|{os.path.abspath(cfg.data)}|{cfg.question_field}|{cfg.answer_field}"
    if cfg.model and cfg.plain_prompts:
        key += "|plain"
    return os.path.join(cfg.out, f"warmstart_{hashlib.sha1(key.encode()).hexdigest()[:8]}")


def save_model_atomically(model, tokenizer, folder: str) -> bool:
    """save_pretrained into a temporary folder of this process's own, then rename: a half-written model is
    never picked up, and when another process built the same folder first (the same command started twice),
    its copy stays and ours is dropped (returns False)."""
    tmp_dir = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    try:
        os.replace(tmp_dir, folder)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return False
    return True


def print_where_it_runs(cfg: Config, model, source: str) -> None:
    """A run's first line: device, precision, model, the update's forward; and, when --device auto lands on the CPU of a
    machine with an NVIDIA driver, a line saying that torch cannot use its GPU."""
    device, precision = device_and_precision(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    tqdm.write(f"running on {device_name(device)}, {precision}, {source} ({parameters / 1e6:.2f}M parameters), "
               f"{'--fast: shared-prompt' if cfg.fast else 'plain'} update forward")
    if cfg.device == "auto" and device.type == "cpu" and nvidia_driver_present():
        tqdm.write("an NVIDIA driver is installed but torch cannot use CUDA, so this runs on the CPU: compare "
                   "python -c 'import torch; print(torch.cuda.is_available(), torch.version.cuda)' with the "
                   "CUDA version nvidia-smi shows (--device cpu silences this)")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


# ----------------------------------------------------------------------------------------------
# Math answers and data files: the checker's parser and normaliser (never an eval), and JSONL tasks.
# ----------------------------------------------------------------------------------------------
MAX_CHECKED_CHARS = 100_000  # longer completions are not parsed: reward 0
MAX_ANSWER_CHARS = 1_000     # a longer final answer is not compared
MAX_ANSWER_DIGITS = 64
_NUMBER_TEXT = r"[-+]?(?:[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?|\.[0-9]+)"  # ASCII digits; 1,234 is one number
_FINAL_MARK = re.compile(r"####[ \t]*\$?[ \t]*(" + _NUMBER_TEXT + r"|[^\n]*)")   # GSM8K: `#### 1,234`
_LATEX_THOUSANDS = re.compile(r"\{,\}|,\\!\s*")  # 14{,}916 and 11,\! 111: a comma inside one number
_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|~|\$|\\\$|\^\{?\\circ\}?|\\circ|\\%|%")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|textnormal|mbox|mathrm)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"(" + _NUMBER_TEXT + r")\s*(?:[a-zA-Z]{2,}\.?\s*)+")  # 5.4 cents, 18 dollars
_FRACTION = re.compile(r"([-+]?)\\frac\{([-+]?[0-9.]+)\}\{([-+]?[0-9.]+)\}")


def boxed_contents(text: str) -> list[str]:
    """The content of every `\\boxed{...}` (or `\\fbox{...}`), with nested braces, in order."""
    contents, start = [], 0
    while (found := min((i for i in (text.find("\\boxed{", start), text.find("\\fbox{", start)) if i >= 0),
                        default=-1)) >= 0:
        opening = text.index("{", found)
        depth, end = 0, opening
        for end in range(opening, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        if depth != 0:
            break  # unbalanced: no answer after this point
        contents.append(text[opening + 1:end])
        start = end + 1
    return contents


def extract_answer(completion: str) -> str | None:
    """The final answer as text: what follows each `####` and what each `\\boxed{}` holds, when they all
    normalise to the same answer. None when there is no such mark, and when two disagree: `\\boxed{1} or
    \\boxed{2}` offers two answers and scores 0 whichever is right. There is no last-number fallback, since
    a number anywhere in a completion is no answer (the built-in task's `reward` reads the last number)."""
    if not completion or len(completion) > MAX_CHECKED_CHARS:
        return None
    answers = [answer for answer in map(str.strip, _FINAL_MARK.findall(completion) + boxed_contents(completion))
               if answer]
    values = {normalize_answer(answer) for answer in answers}
    return answers[-1] if len(values) == 1 and None not in values else None


def parse_number(text: str) -> Fraction | None:
    """'1,234' -> 1234, '-0.50' -> -1/2, '1/2' and '\\frac{1}{2}' -> 1/2; None for anything else, and for
    digits that whitespace separates (`32, 349` and `4 6` are two numbers, not one)."""
    if re.search(r"[0-9.,]\s+[0-9.]", text):
        return None
    text = re.sub(r"\s", "", text)
    if not text or sum(ch.isdigit() for ch in text) > MAX_ANSWER_DIGITS:
        return None
    if fraction := _FRACTION.fullmatch(text):
        sign, numerator, denominator = fraction.groups()
    elif re.fullmatch(r"[-+]?[0-9.]+/[-+]?[0-9.]+", text):
        (numerator, denominator), sign = text.split("/"), ""
    else:
        numerator, denominator, sign = text, "1", ""
    parts = []
    for part in (numerator, denominator):
        if not re.fullmatch(_NUMBER_TEXT, part):
            return None
        parts.append(Fraction(part.replace(",", "")))
    if parts[1] == 0:
        return None
    return -parts[0] / parts[1] if sign == "-" else parts[0] / parts[1]


def normalize_answer(text: str) -> Fraction | str | None:
    """A number when the answer is one (so 0.5 == 1/2 == \\frac{1}{2}), else a canonical LaTeX string.

    Drops what does not change the value: $, \\left/\\right, LaTeX spacing, degrees and percent signs,
    \\text{...} wrappers, trailing units and periods, a leading `x =`; \\dfrac and \\tfrac are \\frac, and
    the LaTeX thousands separators `{,}` and `,\\!` are commas (`,\\!` before its `\\!` is dropped as spacing).
    """
    if text is None or len(text) > MAX_ANSWER_CHARS:
        return None
    text = _LATEX_THOUSANDS.sub(",", text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    text = _LATEX_TEXT.sub(r"\1", text)
    text = _LATEX_SPACING.sub("", text).strip().rstrip(".").strip()
    text = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)", "", text)  # x = 5 -> 5
    text = re.sub(r"\\frac([0-9])([0-9])", r"\\frac{\1}{\2}", text)  # \frac12 -> \frac{1}{2}
    if units := _UNIT_WORDS.fullmatch(text):
        text = units.group(1)
    number = parse_number(text)
    if number is not None:
        return number
    text = re.sub(r"\s+", "", text)
    return re.sub(r"\{([A-Za-z0-9])\}", r"\1", text) or None  # \sqrt{3} == \sqrt3, x^{2} == x^2


def reference_answer(reference: str) -> str:
    """A data set's answer field: its `####` or `\\boxed{}` answer when it is a worked solution, else itself."""
    return extract_answer(reference) if "####" in reference or "\\boxed" in reference else reference


def answers_match(predicted: str | None, reference: str) -> bool:
    predicted_value, reference_value = normalize_answer(predicted), normalize_answer(reference_answer(reference))
    return predicted_value is not None and type(predicted_value) is type(reference_value) and \
        predicted_value == reference_value


# Real data sets: one JSON object per line. The prompt asks for a \boxed{} answer; the checker also
# reads GSM8K's `#### n`.
PROMPT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
MAX_REPORTED_BAD_LINES = 5


def read_problems(path: str, task: str, question_field: str, answer_field: str) -> list[tuple[str, str]]:
    """(prompt, reference answer) per usable line; each unusable line is reported with its line number."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    problems, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append(f"{path}:{number}: not valid JSON ({error.msg})")
                continue
            missing = [name for name in (question_field, answer_field)
                       if not isinstance(row, dict) or not isinstance(row.get(name), (str, int, float))]
            if missing:
                bad.append(f"{path}:{number}: no text field {', '.join(repr(m) for m in missing)}")
                continue
            answer = normalize_answer(reference_answer(str(row[answer_field])))
            if answer is None or (task == "gsm8k" and not isinstance(answer, Fraction)):
                bad.append(f"{path}:{number}: the {answer_field!r} field has no checkable final answer")
                continue
            problems.append((str(row[question_field]) + PROMPT_SUFFIX, str(row[answer_field])))
    for message in bad[:MAX_REPORTED_BAD_LINES]:
        tqdm.write(f"skipped {message}", file=sys.stderr)
    if len(bad) > MAX_REPORTED_BAD_LINES:
        tqdm.write(f"skipped {len(bad) - MAX_REPORTED_BAD_LINES} more unusable lines of {path}", file=sys.stderr)
    if not problems:
        raise UsageError(f"{path}: no usable line" + (f" (first problem: {bad[0]})" if bad else " (the file is empty)"))
    return problems


def load_task(cfg: Config) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) problems for --task: eval is --eval-data, or a fixed --eval-fraction of --data."""
    if cfg.task == "arith":
        return arithmetic_problems(cfg.eval_size)
    problems = read_problems(cfg.data, cfg.task, cfg.question_field, cfg.answer_field)
    if cfg.eval_data:
        return problems, read_problems(cfg.eval_data, cfg.task, cfg.question_field, cfg.answer_field)[:cfg.eval_size]
    random.Random(0).shuffle(problems)
    held_out = max(1, round(cfg.eval_fraction * len(problems)))
    if held_out >= len(problems):
        raise UsageError(f"{cfg.data}: {len(problems)} usable problems leave none for training after holding out "
                         f"--eval-fraction {cfg.eval_fraction}; give --eval-data or more lines")
    return problems[held_out:], problems[:held_out][:cfg.eval_size]


def math_verify_reward(completion: str, answer: str) -> float:
    """--checker math_verify: the `math_verify` package's parser and comparison instead of ours."""
    from math_verify import parse, verify  # optional; check_config says how to install it

    if not completion or len(completion) > MAX_CHECKED_CHARS:
        return 0.0
    return float(verify(parse("$" + (reference_answer(answer) or "").strip() + "$"), parse(completion)))


def math_reward(completion: str, answer: str) -> float:
    """--checker math: 1.0 when the completion's final answer equals the reference answer after
    normalisation (the final answer: the one that every `####` and `\\boxed{}` gives, see `extract_answer`)."""
    return float(answers_match(extract_answer(completion), answer))


CHECKERS = {"arith": reward, "math": math_reward, "math_verify": math_verify_reward}  # --checker


# ----------------------------------------------------------------------------------------------
# The faster drop-in (--fast): one prompt pass per group; then memory: gradient checkpointing, and the peak
# memory a step logs.
# ----------------------------------------------------------------------------------------------
def shared_prompt_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The drop-in for `completion_logits`: the same logits (N, T, V), with the graph. A group's rows share
    one pass over their prompt: its KV cache is computed once, indexed out to its rows (a differentiable
    gather, so every completion's gradient flows back through it), and the completions run on top, saving
    (G - 1) / G of the prompt work. With gradient checkpointing (no KV caches) the plain pass runs."""
    rows_with_prompt = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    unique_rows, row_to_prompt = torch.unique_consecutive(rows_with_prompt, dim=0, return_inverse=True)
    checkpointing = any(getattr(module, "gradient_checkpointing", False) is True and module.training
                        for module in model.modules())
    if len(unique_rows) == len(prompt_ids) or checkpointing:
        return completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    unique_ids, unique_mask = unique_rows.split(prompt_ids.shape[1], dim=1)
    unique_mask = unique_mask.bool()
    cache_name, kv_cache = new_kv_cache(model)
    out = model(input_ids=unique_ids, attention_mask=unique_mask.long(), position_ids=position_ids(unique_mask),
                use_cache=True, **{cache_name: kv_cache}, **last_logits_only(model))
    first_logits = out.logits[:, -1:][row_to_prompt]  # (N, 1, V): the prompt's last position predicts y_0
    if completion_ids.shape[1] == 1:
        return first_logits
    kv_cache.batch_select_indices(row_to_prompt)  # each row gets its prompt's keys and values
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
    out = model(input_ids=completion_ids[:, :-1], attention_mask=mask.long(),
                position_ids=position_ids(mask)[:, prompt_ids.shape[1]:], use_cache=True, **{cache_name: kv_cache})
    return torch.cat([first_logits, out.logits], dim=1)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass. HF layers checkpoint only when
    `.training`, so that flag is set on the checkpointed modules alone: dropout stays off."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (GiB; not on Windows), and peak allocated CUDA memory on a GPU."""
    record = {}
    if importlib.util.find_spec("resource"):  # not on Windows; ru_maxrss is bytes on macOS, KiB on Linux
        import resource
        record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
            1 if sys.platform == "darwin" else 1024) / 2 ** 30
    if device.type == "cuda":
        record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return record


# ----------------------------------------------------------------------------------------------
# Starting and evaluating a run: the data, the model (loaded, warm-started or resumed), greedy accuracy.
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, tokenizer, problems: list[tuple[str, str]], max_new_tokens: int, batch_size: int = 256,
             checker=reward) -> float:
    """Greedy accuracy on held-out problems, in batches."""
    correct = 0.0
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        rollout = sample_completions(model, encode_prompts(tokenizer, [p for p, _ in batch]), max_new_tokens, 0.0,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id, None)
        correct += score(tokenizer, rollout, [a for _, a in batch], 1, checker).sum().item()
    return correct / len(problems)


@dataclass
class Run:
    """What a run carries from step to step; its checkpoint holds the parts that change."""
    cfg: Config
    models: ModelsAndOptimizer
    tokenizer: object
    train_problems: list[tuple[str, str]]
    eval_problems: list[tuple[str, str]]
    checker: object           # reward(completion, answer) -> 0.0 or 1.0
    folder: RunFolder         # the run's folder under --out and its files
    source: str               # where the policy at the start of RL came from
    device: torch.device
    prompt_rng: random.Random
    ref_values: dict[str, float] = field(default_factory=dict)  # A*-PO's V_ref per prompt
    # the steps' wall-clock seconds and completion tokens so far
    totals: dict = field(default_factory=lambda: {"seconds": 0.0, "tokens": 0})
    evals: list[float] = field(default_factory=list)            # greedy accuracy at each evaluation so far
    clock: float = field(default_factory=time.perf_counter)     # when the last step was logged


def start_run(cfg: Config, problems: tuple[list, list] | None = None) -> tuple[Run, int]:
    """The run and the step it starts after: 0 (having evaluated the warm start), or its checkpoint's."""
    device, precision = device_and_precision(cfg)
    train_problems, eval_problems = problems or load_task(cfg)
    if len(train_problems) < cfg.prompts_per_step:
        raise UsageError(f"{len(train_problems)} training problems are fewer than --prompts-per-step "
                         f"{cfg.prompts_per_step}")
    folder = RunFolder(cfg)
    folder.check_start(cfg.resume)  # a new run never overwrites one; --resume needs a checkpoint
    policy, tokenizer, source = load_model(cfg, train_problems, device, say_where_it_runs=True)
    models = prepare_models(cfg, policy, tokenizer, device, precision)
    run = Run(cfg, models, tokenizer, train_problems, eval_problems, CHECKERS[cfg.checker], folder, source, device,
              prompt_rng=random.Random(cfg.seed))
    if cfg.resume:
        start_step = run.folder.resume(run)
    else:
        start_step = 0
        run.evals.append(accuracy(run))
        run.folder.write_start(run)  # config.json, the step-0 line of metrics.jsonl, the first checkpoint
    run.clock = time.perf_counter()  # the first step's seconds start here
    return run, start_step


def accuracy(run: Run) -> float:
    """The policy's greedy accuracy on the held-out problems, in batches as big as a rollout."""
    cfg = run.cfg
    with autocast(run.device, run.models.precision):
        return evaluate(run.models.policy, run.tokenizer, run.eval_problems, cfg.max_new_tokens,
                        cfg.prompts_per_step * cfg.group_size, run.checker)


# ----------------------------------------------------------------------------------------------
# Run files and resume: one folder per setting, lines appended, other files written then renamed.
# ----------------------------------------------------------------------------------------------
SAMPLES_PER_EVALUATION = 4  # completions appended to samples.jsonl at each evaluation
NOT_THE_SETTING = ("steps", "eval_every", "out", "device", "resume", "grad_checkpointing", "micro_batch", "fast")


def run_folder(cfg: Config) -> str:
    """One folder per setting: not the budget, device, speed and memory savers, resume, nor an experiment's flags."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if f.name not in NOT_THE_SETTING}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    return os.path.join(cfg.out, f"{cfg.loss}_lag{cfg.lag}_beta{cfg.beta:g}_seed{cfg.seed}_{digest}")


def log_step(run: Run, step: int, prompts: list[tuple[str, str]], result: StepResult, record: dict,
             step_accuracy: float | None) -> None:
    """The step's line of metrics.jsonl, with its wall-clock seconds (an evaluation's included), completion
    tokens per second and peak memory; at an evaluation its accuracy, samples and checkpoint."""
    now = time.perf_counter()
    seconds, run.clock = now - run.clock, now
    tokens = int(result.rollout.completion_mask.sum())
    run.totals["seconds"] += seconds
    run.totals["tokens"] += tokens
    record.update(step_seconds=seconds, tokens_per_s=tokens / seconds, **peak_memory(run.device))
    if step_accuracy is not None:
        record["eval_accuracy"] = step_accuracy
        run.evals.append(step_accuracy)
    append_line(run.folder.metrics, record)
    if step_accuracy is not None:
        run.folder.append_samples(run.tokenizer, prompts, result, step)  # a few completions; prints one
        run.folder.save_checkpoint(run, step)


class RunFolder:
    """A run's folder and its files: config.json (the flags as resolved, where it ran), metrics.jsonl,
    samples.jsonl, checkpoint.pt, summary.json (`experiments/curves.py` draws curves.png from the metrics)."""

    def __init__(self, cfg: Config):
        self.path = run_folder(cfg)
        self.checkpoint, self.metrics, self.samples = (os.path.join(self.path, name) for name in
                                                       ("checkpoint.pt", "metrics.jsonl", "samples.jsonl"))

    def check_start(self, resume: bool) -> None:
        """A new run needs a folder with no run in it; --resume, one with a checkpoint."""
        if resume and not os.path.exists(self.checkpoint):
            raise UsageError(f"--resume: no checkpoint in {self.path}; run once without --resume first")
        if not resume and os.path.exists(self.metrics):
            raise UsageError(f"{self.path} already holds a run; pass --resume to continue it, or delete the folder")

    def write_start(self, run: Run) -> None:
        """config.json, the warm start's accuracy as metrics.jsonl's step 0, the step-0 checkpoint."""
        os.makedirs(self.path, exist_ok=True)
        write_atomically(os.path.join(self.path, "config.json"), json.dumps(
            {**dataclasses.asdict(run.cfg), "model_source": run.source, "device": str(run.device),
             "resolved_precision": run.models.precision, "device_name": device_name(run.device),
             "parameters": sum(p.numel() for p in run.models.policy.parameters())}, indent=1))
        append_line(self.metrics, {"step": 0, "eval_accuracy": run.evals[0]})
        self.save_checkpoint(run, 0)

    def save_checkpoint(self, run: Run, step: int) -> None:
        """What a resumed run needs to go on as if it never stopped (not pi_ref: the warm start), in plain
        types and tensors only (it loads with weights_only=True), written then renamed."""
        models = run.models
        torch.save({"step": step, "policy": models.policy.state_dict(), "generator": models.generator.state_dict(),
                    "optimizer": models.optimizer.state_dict(), "prompt_rng": run.prompt_rng.getstate(),
                    "ref_values": run.ref_values, "totals": run.totals}, self.checkpoint + ".tmp")
        os.replace(self.checkpoint + ".tmp", self.checkpoint)

    def resume(self, run: Run) -> int:
        """--resume: load the last checkpoint (weights_only: a checkpoint from elsewhere cannot run code) and drop
        the lines written after it."""
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            run.models.policy.load_state_dict(state["policy"])
            run.models.generator.load_state_dict(state["generator"])
            run.models.optimizer.load_state_dict(state["optimizer"])
        except Exception as error:  # cut short, damaged, another model's, or not plain tensors and types
            detail = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())[:200]  # torch's: colours, many lines
            raise UsageError(f"--resume: {self.checkpoint} cannot be read ({type(error).__name__}: {detail}); "
                             f"delete {self.path} to start the run again") from None
        run.prompt_rng.setstate(state["prompt_rng"])
        run.ref_values, run.totals = state["ref_values"], {**run.totals, **state["totals"]}
        for path in (self.metrics, self.samples):
            drop_lines_after(path, state["step"])
        tqdm.write(f"resuming {self.path} at step {state['step']}")
        run.evals = [m["eval_accuracy"] for m in read_lines(self.metrics) if "eval_accuracy" in m]
        return state["step"]

    def append_samples(self, tokenizer, prompts: list[tuple[str, str]], result: StepResult, step: int) -> None:
        """What the model writes: the first completion of each of the batch's first SAMPLES_PER_EVALUATION
        prompts, with its reward, appended to samples.jsonl; the first one printed."""
        group_size, count = result.rewards.shape[1], SAMPLES_PER_EVALUATION
        texts = completion_texts(tokenizer, result.rollout.rows(slice(0, count * group_size, group_size)))
        samples = [{"step": step, "prompt": prompt, "completion": text, "reward": result.rewards[i, 0].item(),
                    "answer": answer} for i, ((prompt, answer), text) in enumerate(zip(prompts, texts))]
        for sample in samples:
            append_line(self.samples, sample)
        shown = samples[0]
        tqdm.write(f"step {step} sample: {shown['prompt'][-80:]!r} -> {shown['completion'][:240]!r}, reward "
                   f"{shown['reward']:g} (answer {shown['answer'][-40:]!r}); more in {self.samples}")

    def write_summary(self, run: Run) -> dict:
        """summary.json: accuracy before and after, minutes, KL(mu || pi) at each stale cycle's end, leakage, the
        mean |log pi/mu| per completion right after each refresh (the floor that rounding, not the lag, sets)."""
        cfg, totals = run.cfg, run.totals
        steps = [m for m in read_lines(self.metrics) if "loss" in m]
        cycle_ends = [m["kl_sequence"] for m in steps if m["staleness"] == cfg.lag - 1 or m["step"] == cfg.steps]
        summary = {"run": self.path, "loss": cfg.loss, "lag": cfg.lag, "steps": cfg.steps,
                   "warm_start_accuracy": run.evals[0], "final_accuracy": run.evals[-1],
                   "best_accuracy": max(run.evals), "minutes": totals["seconds"] / 60,
                   "tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
                   "kl_at_cycle_ends": cycle_ends,
                   "final_mass_leakage": mean([m["mass_leakage"] for m in steps[-10:]]),
                   "log_ratio_floor": mean([m.get("log_ratio_abs_mean") for m in steps if m["staleness"] == 0])}
        write_atomically(os.path.join(self.path, "summary.json"), json.dumps(summary, indent=1))
        return summary


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def append_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_lines(path: str) -> list[dict]:
    """The records of a JSON-lines file; a line that is not JSON (a last line cut short by a stop mid-write) is
    left out."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def drop_lines_after(path: str, step: int) -> None:
    """Resume: the lines of steps after the checkpoint's, and a line cut short, are dropped (written, then renamed)."""
    if os.path.exists(path):
        kept = [json.dumps(m) for m in read_lines(path) if m["step"] <= step]
        write_atomically(path, "\n".join(kept))


def mean(values) -> float:
    """Mean of the values that are not None or NaN (NaN when none are): averages over steps and seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# Main: parse and check the flags, train, print the summary; errors are one line and an exit code.
# ----------------------------------------------------------------------------------------------
def format_summary(summary: dict) -> str:
    """The run in one line, then what happened in three lines, then where its files are."""
    kl = summary["kl_at_cycle_ends"]
    return "\n".join([
        f"{summary['loss']}, lag {summary['lag']}: {summary['steps']} steps in {summary['minutes']:.2f} minutes, "
        f"{summary['tokens_per_s']:.0f} completion tokens/s (evaluations included)",
        f"greedy accuracy {summary['warm_start_accuracy']:.3f} -> {summary['final_accuracy']:.3f} "
        f"(best {summary['best_accuracy']:.3f})",
        f"KL(mu || pi) per completion at the end of each of {len(kl)} stale cycles: mean {mean(kl):.3f}, "
        f"largest {max(kl, default=float('nan')):.3f}",
        f"mass leakage over the last 10 steps: {summary['final_mass_leakage']:.3f} (1: the policy kept its mass "
        f"on the sampled completions)",
        f"metrics: {os.path.join(summary['run'], 'metrics.jsonl')}, "
        f"samples: {os.path.join(summary['run'], 'samples.jsonl')}",
        f"curves: python experiments/curves.py {summary['run']} (with matplotlib)"])


def run_command(argv: list[str] | None, config_class, work, check=check_config, description: str | None = None,
                interrupted: str = "rerun the same command with --resume to continue from the last checkpoint") -> int:
    """Parse and check the flags of `config_class`, then `work(cfg)`; bad input, divergence, GPU memory or an
    interruption end with one line (exit 2, 1, 1, 130); `interrupted` says how to go on."""
    try:
        cfg = parse_config(argv, config_class, description)
        check(cfg)
        work(cfg)
        return 0
    except (UsageError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; give --micro-batch (the update's rows per pass; experiments/bench.py "
              "--micro-batch G --activation-budget GB finds the most that fit; --resume continues the run with "
              "it), or lower --prompts-per-step, --group-size or --max-new-tokens (sampling keeps every "
              "completion's KV cache)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    def one_run(cfg: Config) -> None:
        print(format_summary(train(cfg, load_task(cfg))))  # a bad data file stops in load_task, before any model

    return run_command(argv, Config, one_run)


if __name__ == "__main__":
    sys.exit(main())
