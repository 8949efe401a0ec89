"""The benchmark: one warm-up RL step, then N timed steps of the configured loss, lag and batch shape on
--model (or the built-in model); prints seconds per step (generation, reference log-probs, update),
completion tokens/s, peak memory and the share of the machine's measured matmul throughput the step's
useful FLOPs reach (MFU), and writes them to bench_*.json in --out. Every trainer flag applies.

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
from dataclasses import dataclass

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offpolicy_pessimism import (CHECKERS, CompiledDecodeStep, Config, UsageError, check_config, flag,  # noqa: E402
                                 device_and_precision, fixed_uniforms, load_model, load_task, peak_memory,
                                 prepare_models, refresh_generator, rl_step, run_command,
                                 write_atomically)


@dataclass
class BenchConfig(Config):
    """The trainer's flags, then the benchmark's."""
    bench: int = flag(3, "time N RL steps after one warm-up step, print them and write bench_*.json in --out")


def check_bench(cfg: BenchConfig) -> None:
    if cfg.bench < 1:
        raise UsageError(f"--bench must be at least 1, got {cfg.bench}")
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


def benchmark(cfg: BenchConfig, problems: tuple[list, list]) -> dict:
    """--bench N: one warm-up step, then N timed RL steps of the configured loss, lag and batch shape."""
    device, precision = device_and_precision(cfg)
    train_problems = problems[0]
    policy, tokenizer, source = load_model(dataclasses.replace(cfg, warm_start_steps=0), train_problems, device)
    models = prepare_models(cfg, policy, tokenizer, device, precision)
    prompt_rng = random.Random(cfg.seed)
    timed_steps = []
    matmul_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    matmul_before = matmul_flops_per_second(device, matmul_dtype)  # measured before and after the steps:
    for step in tqdm(range(cfg.bench + 1), desc="bench", dynamic_ncols=True):
        batch = prompt_rng.sample(train_problems, cfg.prompts_per_step)
        uniforms = fixed_uniforms(f"{cfg.seed}|{step}", len(batch) * cfg.group_size, cfg.max_new_tokens)
        if step % cfg.lag == 0:
            refresh_generator(models.generator, models.policy)
        result = rl_step(cfg, models, tokenizer, batch, step % cfg.lag, uniforms, {}, CHECKERS[cfg.checker])
        if step > 0:  # step 0 warms up the allocator, the kernels and first-call overheads; keep numbers only
            timed_steps.append({**result.seconds, "micro_batch": result.micro_batch,
                                "generated_tokens": int(result.rollout.completion_mask.sum()),
                                "prompt_tokens": int(result.rollout.prompt_mask.sum())})
    timed = {key: sum(step[key] for step in timed_steps)
             for key in ("generation", "logprobs", "update", "generated_tokens", "prompt_tokens")}
    timed["trained_tokens"] = timed["generated_tokens"] + timed["prompt_tokens"]

    steps = cfg.bench
    seconds = (timed["generation"] + timed["logprobs"] + timed["update"]) / steps
    parameters = sum(p.numel() for p in policy.parameters())
    step_flops = (2 * parameters * timed["generated_tokens"] + 6 * parameters * timed["trained_tokens"]) / steps
    matmul_after = matmul_flops_per_second(device, matmul_dtype)   # a shared machine's speed drifts
    matmul_flops = (matmul_before + matmul_after) / 2
    report = {
        "model": source, "parameters": parameters, "device": str(device), "precision": precision,
        "threads": torch.get_num_threads(), "loss": cfg.loss, "prompts_per_step": cfg.prompts_per_step,
        "group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
        "micro_batch": timed_steps[-1]["micro_batch"],
        "micro_batch_auto": cfg.micro_batch == 0,
        "compiled_decoding": isinstance(models.next_logits, CompiledDecodeStep),
        "timed_steps": steps, "seconds_per_step": seconds,
        "generation_seconds": timed["generation"] / steps,
        **({"logprob_seconds": timed["logprobs"] / steps} if models.reference is not None else {}),
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
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, f"bench_{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_atomically(path, json.dumps(report, indent=1))
    report["path"] = path
    return report


def format_bench(report: dict) -> str:
    r = report
    logprobs = f"{r['logprob_seconds']:.2f}" if "logprob_seconds" in r else "-"  # only A*-PO needs a pass
    lines = [f"{r['model']}: {r['parameters'] / 1e6:.1f}M parameters, {r['device']} ({r['threads']} threads), "
             f"{r['precision']}, {r['prompts_per_step']} prompts x {r['group_size']} completions x "
             f"{r['max_new_tokens']} new tokens, micro-batch {r['micro_batch']}"
             f"{' (auto)' if r['micro_batch_auto'] else ''}, {r['loss']}, "
             f"decoding {'compiled, static cache' if r['compiled_decoding'] else 'eager'}",
             "| seconds/step | generation | ref log-probs | update | completion tokens/s | peak RSS GiB | "
             "matmul GFLOP/s | matmul bound s | MFU |", "|" + "---|" * 9,
             f"| {r['seconds_per_step']:.2f} | {r['generation_seconds']:.2f} | {logprobs} | {r['update_seconds']:.2f} | "
             f"{r['completion_tokens_per_s']:.0f} | {r.get('peak_rss_gb', float('nan')):.2f} | "
             f"{r['matmul_gflops_measured']:.0f} | "
             f"{r['matmul_bound_seconds']:.2f} | {r['mfu']:.2f} |",
             f"matmul GFLOP/s before / after the steps: {r['matmul_gflops_before']:.0f} / {r['matmul_gflops_after']:.0f}; "
             f"useful work {r['step_useful_gflop']:.0f} GFLOP per step (2 x parameters x generated tokens + "
             f"6 x parameters x trained tokens)"]
    if "peak_gpu_memory_gb" in r:
        lines.append(f"peak GPU memory: {r['peak_gpu_memory_gb']:.2f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def bench(cfg: BenchConfig) -> None:
        report = benchmark(cfg, load_task(cfg))
        print(format_bench(report))
        print(f"written: {report['path']}")

    return run_command(argv, BenchConfig, bench, check=check_bench, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
