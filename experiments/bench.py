"""The benchmark: one warm-up RL step, then N timed steps of the configured loss, lag and batch shape on
--model (or the built-in model); prints seconds per step (generation, then the rest: scoring, log-probs,
backward and AdamW), completion tokens/s, peak memory and the share of the machine's measured matmul
throughput the step's useful FLOPs reach (MFU), and writes them to bench_*.json in --out. Every trainer flag
applies (`--fast` times the update's drop-in). `--activation-budget GB` also measures the activations a
token keeps for the backward pass and prints the largest `--micro-batch` whose activations fit.

    python experiments/bench.py --bench 3 --model MODEL_DIR --prompts-per-step 16 --group-size 8 --max-new-tokens 256

The warm start is skipped: the model is timed as loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import offpolicy_pessimism as trainer  # noqa: E402
from offpolicy_pessimism import (CHECKERS, Config, Rollout, UsageError, autocast, check_config,  # noqa: E402
                                 completion_logprobs, device_and_precision, fixed_uniforms, flag, load_model,
                                 load_task, peak_memory, prepare_models, refresh_generator, rl_step, run_command,
                                 write_atomically)


@dataclass
class BenchConfig(Config):
    """The trainer's flags, then the benchmark's."""
    bench: int = flag(3, "time N RL steps after one warm-up step, print them and write bench_*.json in --out")
    activation_budget: float = flag(0.0, "also print the largest --micro-batch whose activations (kept for the "
                                    "backward pass) fit this many GB, for the timed batches' shape (0: skip)")


def check_bench(cfg: BenchConfig) -> None:
    if cfg.bench < 1:
        raise UsageError(f"--bench must be at least 1, got {cfg.bench}")
    if cfg.activation_budget < 0:
        raise UsageError(f"--activation-budget must be at least 0, got {cfg.activation_budget}")
    if cfg.resume:
        raise UsageError("the benchmark times a few steps on its own; drop --resume")
    check_config(cfg, one_run=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that wall-clock timings include the queued GPU work


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int = 2048,
                            min_seconds: float = 1.0) -> float:
    """Measured GEMM throughput: (size x size) @ (size x size) products, repeated for min_seconds."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or count < 3:
        torch.matmul(a, b)
        count += 1
        if count % 8 == 0 or device.type != "cuda":
            synchronize(device)
    synchronize(device)
    return 2 * size ** 3 * count / (time.perf_counter() - started)


@contextmanager
def timing_sampling(seconds: dict, device: torch.device):
    """The trainer's rl_step calls sample_groups and reference_values (A*-PO's V_ref samples) by name: wrapped
    while this lasts, their wall-clock seconds add up in seconds["generation"]; the trainer keeps no clock."""
    originals = {name: getattr(trainer, name) for name in ("sample_groups", "reference_values")}

    def timed(function):
        @wraps(function)
        def wrapper(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            seconds["generation"] += time.perf_counter() - started
            return result
        return wrapper

    for name, function in originals.items():
        setattr(trainer, name, timed(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(trainer, name, function)


def activation_bytes_per_token(model, precision: str, logits_of) -> float:
    """Bytes a forward pass keeps for backward per completion token, measured: the tensors saved on a row of
    48 and one of 16 completion tokens, parameters excluded, the difference / 32 (what does not grow with
    length cancels). A prompt token costs less (no logits), so this bounds both."""
    device = next(model.parameters()).device
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(width: int) -> int:
        storages = {}

        def keep(tensor):
            if tensor.untyped_storage().data_ptr() not in parameters:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            # not the tensor itself: a saved output holding its own graph node is a cycle gc never frees
            return tensor.detach()

        ids = torch.zeros(1, 8 + width, dtype=torch.long, device=device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        probe = Rollout(ids[:, :8], mask[:, :8], ids[:, 8:], mask[:, 8:], torch.zeros(1, width, device=device),
                        ~mask[:, 0])  # one row: 8 prompt tokens, then `width` completion tokens
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast(device, precision):
            completion_logprobs(model, probe, 1.0, logits_of)
        return sum(storages.values())

    return (saved_bytes(48) - saved_bytes(16)) / 32


def largest_micro_batch(prompt_width: int, completion_width: int, group_size: int, rows: int,
                        bytes_per_token: float, budget_bytes: float) -> int:
    """The most whole groups whose activations fit the budget (a group is one prompt pass plus G completions
    with --fast, G prompt passes without: counted as G, which bounds both), or, when one group does not fit,
    the most rows that do (at least 1)."""
    group_bytes = group_size * (prompt_width + completion_width) * bytes_per_token
    if group_bytes <= budget_bytes:
        return min(rows, group_size * int(budget_bytes // group_bytes))
    return max(1, int(budget_bytes // ((prompt_width + completion_width) * bytes_per_token)))


def benchmark(cfg: BenchConfig, problems: tuple[list, list]) -> dict:
    """--bench N: one warm-up step, then N timed RL steps of the configured loss, lag and batch shape."""
    device, precision = device_and_precision(cfg)
    train_problems = problems[0]
    policy, tokenizer, source = load_model(dataclasses.replace(cfg, warm_start_steps=0), train_problems, device)
    models = prepare_models(cfg, policy, tokenizer, device, precision)
    prompt_rng = random.Random(cfg.seed)
    timed_steps, seconds = [], {"generation": 0.0}
    matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul_before = matmul_flops_per_second(device, matmul_dtype)  # measured before and after the steps:
    with timing_sampling(seconds, device):
        for step in tqdm(range(cfg.bench + 1), desc="bench", dynamic_ncols=True):
            batch = prompt_rng.sample(train_problems, cfg.prompts_per_step)
            uniforms = fixed_uniforms(f"{cfg.seed}|{step}", len(batch) * cfg.group_size, cfg.max_new_tokens)
            if step % cfg.lag == 0:
                refresh_generator(models.generator, models.policy)
            seconds["generation"] = 0.0
            synchronize(device)
            started = time.perf_counter()
            result = rl_step(cfg, models, tokenizer, batch, step % cfg.lag, uniforms, {}, CHECKERS[cfg.checker])
            synchronize(device)
            if step > 0:  # step 0 warms up the allocator, the kernels and first-call overheads; keep numbers only
                step_seconds = time.perf_counter() - started
                timed_steps.append({"seconds": step_seconds, "generation": seconds["generation"],
                                    "update": step_seconds - seconds["generation"],
                                    "generated_tokens": int(result.rollout.completion_mask.sum()),
                                    "prompt_tokens": int(result.rollout.prompt_mask.sum())})
    timed = {key: sum(step[key] for step in timed_steps)
             for key in ("seconds", "generation", "update", "generated_tokens", "prompt_tokens")}
    timed["trained_tokens"] = timed["generated_tokens"] + timed["prompt_tokens"]

    steps = cfg.bench
    seconds = timed["seconds"] / steps
    parameters = sum(p.numel() for p in policy.parameters())
    step_flops = (2 * parameters * timed["generated_tokens"] + 6 * parameters * timed["trained_tokens"]) / steps
    matmul_after = matmul_flops_per_second(device, matmul_dtype)   # a shared machine's speed drifts
    matmul_flops = (matmul_before + matmul_after) / 2
    report = {
        "model": source, "parameters": parameters, "device": str(device), "precision": precision,
        "threads": torch.get_num_threads(), "loss": cfg.loss, "prompts_per_step": cfg.prompts_per_step,
        "group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
        "micro_batch": cfg.micro_batch, "fast": cfg.fast,
        "timed_steps": steps, "seconds_per_step": seconds,
        "generation_seconds": timed["generation"] / steps,
        "update_seconds": timed["update"] / steps,
        "generated_tokens_per_step": timed["generated_tokens"] / steps,
        "trained_tokens_per_step": timed["trained_tokens"] / steps,
        "completion_tokens_per_s": timed["generated_tokens"] / steps / seconds,
        "generation_tokens_per_s": timed["generated_tokens"] / max(timed["generation"], 1e-9),
        **peak_memory(device),
        "matmul_gflops_measured": matmul_flops / 1e9,
        "matmul_gflops_before": matmul_before / 1e9, "matmul_gflops_after": matmul_after / 1e9,
        "step_useful_gflop": step_flops / 1e9,
        "matmul_bound_seconds": step_flops / matmul_flops,
        "mfu": step_flops / seconds / matmul_flops,
    }
    if cfg.activation_budget:
        report["activation_bytes_per_token"] = activation_bytes_per_token(policy, precision, models.logits_of)
        rollout = result.rollout  # the last timed batch's shape
        report["largest_micro_batch"] = largest_micro_batch(
            int(rollout.prompt_mask.any(0).sum()), int(rollout.completion_mask.sum(-1).max()), cfg.group_size,
            rollout.completion_ids.shape[0], report["activation_bytes_per_token"], cfg.activation_budget * 1e9)
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, f"bench_{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_atomically(path, json.dumps(report, indent=1))
    report["path"] = path
    return report


def format_bench(report: dict) -> str:
    r = report
    lines = [f"{r['model']}: {r['parameters'] / 1e6:.1f}M parameters, {r['device']} ({r['threads']} threads), "
             f"{r['precision']}, {r['prompts_per_step']} prompts x {r['group_size']} completions x "
             f"{r['max_new_tokens']} new tokens, micro-batch {r['micro_batch'] or 'the whole batch'}, {r['loss']}, "
             f"update forward {'shared-prompt (--fast)' if r['fast'] else 'plain'}",
             "| seconds/step | generation | the rest (score, log-probs, backward, AdamW) | completion tokens/s | "
             "peak RSS GiB | matmul GFLOP/s | matmul bound s | MFU |", "|" + "---|" * 8,
             f"| {r['seconds_per_step']:.2f} | {r['generation_seconds']:.2f} | {r['update_seconds']:.2f} | "
             f"{r['completion_tokens_per_s']:.0f} | {r.get('peak_rss_gb', float('nan')):.2f} | "
             f"{r['matmul_gflops_measured']:.0f} | "
             f"{r['matmul_bound_seconds']:.2f} | {r['mfu']:.2f} |",
             f"matmul GFLOP/s before / after the steps: {r['matmul_gflops_before']:.0f} / {r['matmul_gflops_after']:.0f}; "
             f"useful work {r['step_useful_gflop']:.0f} GFLOP per step (2 x parameters x generated tokens + "
             f"6 x parameters x trained tokens)"]
    if "peak_gpu_memory_gb" in r:
        lines.append(f"peak GPU memory: {r['peak_gpu_memory_gb']:.2f} GiB")
    if "largest_micro_batch" in r:
        groups = "whole groups" if r["largest_micro_batch"] % r["group_size"] == 0 else "less than a group"
        lines.append(f"activations kept for backward: {r['activation_bytes_per_token'] / 1e6:.2f} MB per token; "
                     f"--micro-batch {r['largest_micro_batch']} fits the budget ({groups})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def bench(cfg: BenchConfig) -> None:
        report = benchmark(cfg, load_task(cfg))
        print(format_bench(report))
        print(f"written: {report['path']}")

    return run_command(argv, BenchConfig, bench, check=check_bench, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
