"""The benchmark entry point: `python -m benchmarks [--quick] [--compile] [--threads N] [--out docs/benchmarks.md]`.

Everything is measured on this machine in one run, each section in a fresh Python process, with warm-up and
interleaved repeats (plain, fast and the spikingjelly Spikformer alternate, so load from other processes hits all
alike); reported figures are medians, ratios are medians of per-repeat ratios. Peak memory comes from a fresh process
per configuration (max RSS). The last section runs `spkprune bench` through the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import baseline, cases
from benchmarks.bench_cli import bench_digits
from benchmarks.report import report
from benchmarks.timing import interleaved, machine, median, paired_ratio

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PRESET = "spikformer-4-384-cifar10"
DIGITS_PRESET = "spikformer-2-64-digits"
KEEPS = (0.9, 0.7, 0.5)

FULL = dict(train_batch=16, train_repeats=5, digits_batch=64, digits_repeats=7, eval_batch=32, eval_repeats=7,
            mask_repeats=8, export_repeats=5, memory_steps=2, bench_repeats=10)
QUICK = dict(train_batch=4, train_repeats=2, digits_batch=32, digits_repeats=3, eval_batch=8, eval_repeats=2,
             mask_repeats=3, export_repeats=2, memory_steps=1, bench_repeats=3)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_paths(compile: bool) -> tuple[str, ...]:
    return cases.PATHS + ((cases.COMPILED_PATH,) if compile else ())


def _against(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Speed-up of every other path against `reference` (reference time / path time, per repeat)."""
    return {path: paired_ratio(times[reference], t) for path, t in times.items() if path != reference}


def train_throughput(preset: str, batch: int, repeats: int, compile: bool, profile: bool = False,
                     with_spikingjelly: bool = False) -> dict:
    steps = {path: cases.training_setup(preset, batch, path) for path in training_paths(compile)}
    if with_spikingjelly:
        steps[baseline.NAME] = baseline.SpikingjellyTrainStep(preset, batch)
    times = interleaved(steps, warmup=1, repeats=repeats)
    rows = [{"path": name, "images_per_s": batch / median(t), "step_s": median(t)} for name, t in times.items()]
    ours = {path: t for path, t in times.items() if path != baseline.NAME}
    result = {"preset": preset, "batch": batch, "rows": rows, "vs_plain": _against(ours, "plain"),
              "speedup": paired_ratio(times["plain"], times["fast"])}
    if compile:
        result["compiled_speedup"] = paired_ratio(times["plain"], times[cases.COMPILED_PATH])
    if with_spikingjelly:
        result["vs_spikingjelly"] = _against(times, baseline.NAME)
    if profile:
        result["dense"] = {path: cases.dense_time(steps[path]) for path in ("plain", _fastest(steps))}
    return result


def _fastest(paths: dict) -> str:
    return cases.COMPILED_PATH if cases.COMPILED_PATH in paths else "fast"


def memory_env(threads: int | None = None) -> dict[str, str]:
    """glibc serves allocations of 1 MiB and more from mmap and unmaps them when freed, so max RSS follows the live
    tensors instead of what the heap keeps after fragmentation (without it the same step reads 2x higher on its
    second repeat, for every path)."""
    return dict(thread_env(threads), MALLOC_MMAP_THRESHOLD_=str(1 << 20))


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of a section's process: PyTorch's threads from OMP_NUM_THREADS when --threads is given."""
    return dict(os.environ) if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))


def train_memory(preset: str, batch: int, steps: int, compile: bool, threads: int | None) -> dict[str, dict]:
    out = {}
    for path in training_paths(compile):
        cmd = [sys.executable, "-m", "benchmarks.memory", preset, str(batch), path, str(steps)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=memory_env(threads))
        out[path] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def mask_overhead(preset: str, batch: int, repeats: int) -> dict:
    model = cases.make_model(preset)
    images, targets = cases.batch_for(model, batch)
    net = cases.training_net(model, "fast")
    unmasked = cases.TrainStep(model, net, images, targets)
    masked = cases.TrainStep(model, net, images, targets, masks=cases.magnitude_masks(model, 0.8))
    times = interleaved({"without masks": unmasked, "with masks": masked}, warmup=1, repeats=repeats)
    # The masks add only the MaskEnforcer's calls to a step (the dense work is the same), so their overhead is timed
    # directly: whole-step differences move by several percent from one repeat to the next on this machine.
    enforcer = median(masked.mask_seconds[-repeats:])
    return {"times": {k: median(v) for k, v in times.items()}, "enforcer_s": enforcer,
            "step_ratio": paired_ratio(times["with masks"], times["without masks"]),
            "overhead": enforcer / median(times["without masks"])}


def eval_throughput(preset: str, batch: int, repeats: int, compile: bool, with_spikingjelly: bool = False) -> dict:
    passes = cases.eval_setups(preset, batch, KEEPS, compile=compile)
    if with_spikingjelly:
        passes[baseline.NAME] = baseline.eval_pass(preset, batch)
    times = interleaved(passes, warmup=1, repeats=repeats)
    rows = [{"path": name, "images_per_s": batch / median(t)} for name, t in times.items()]
    fastest = "fast keep 1.0 compiled" if compile else "fast keep 1.0"
    dense_paths = [path for path in times if path in ("plain", "fast keep 1.0", "fast keep 1.0 compiled")]
    result = {"preset": preset, "batch": batch, "rows": rows,
              "vs_plain": _against({p: times[p] for p in dense_paths}, "plain"),
              "speedup": paired_ratio(times["plain"], times["fast keep 1.0"]),
              "keep07_gain": paired_ratio(times["fast keep 1.0"], times["fast keep 0.7"]),
              "dense": {path: cases.dense_time(passes[path]) for path in ("plain", fastest)}}
    if compile:
        result["compiled_speedup"] = paired_ratio(times["plain"], times["fast keep 1.0 compiled"])
    if with_spikingjelly:
        result["vs_spikingjelly"] = _against({p: times[p] for p in (*dense_paths, baseline.NAME)}, baseline.NAME)
    return result


def in_fresh_process(section: str, *args, threads: int | None = None) -> dict:
    """`section(*args)` in a new Python process (see `benchmarks.section`): every measurement starts from the same
    state, whatever ran before it (glibc's heap keeps what earlier sections grew, which changes later timings)."""
    cmd = [sys.executable, "-m", "benchmarks.section", section, json.dumps(args)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=thread_env(threads))
    if result.returncode != 0:
        raise RuntimeError(f"benchmark section {section} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool, compile: bool, threads: int | None = None) -> dict:
    p = QUICK if quick else FULL
    if threads is not None:
        torch.set_num_threads(threads)  # so that the machine table shows the sections' threads
    results: dict = {"machine": machine(), "settings": p, "compile": compile}

    def section(name: str, *args) -> dict:
        return in_fresh_process(name, *args, threads=threads)

    log(f"training {TRAIN_PRESET} batch {p['train_batch']} (with {baseline.NAME}) ...")
    results["train"] = section("train_throughput", TRAIN_PRESET, p["train_batch"], p["train_repeats"], compile, True,
                               True)
    log(f"training {DIGITS_PRESET} batch {p['digits_batch']} ...")
    results["train_digits"] = section("train_throughput", DIGITS_PRESET, p["digits_batch"], p["digits_repeats"],
                                      compile)
    log("peak training memory (fresh processes) ...")
    results["memory"] = train_memory(TRAIN_PRESET, p["train_batch"], p["memory_steps"], compile, threads)
    results["memory_digits"] = train_memory(DIGITS_PRESET, p["digits_batch"], p["memory_steps"], compile, threads)
    log("mask overhead ...")
    results["masks"] = section("mask_overhead", DIGITS_PRESET if quick else TRAIN_PRESET,
                               p["digits_batch"] if quick else p["train_batch"], p["mask_repeats"])
    log(f"eval {TRAIN_PRESET} batch {p['eval_batch']} (with {baseline.NAME}) ...")
    results["eval"] = section("eval_throughput", TRAIN_PRESET, p["eval_batch"], p["eval_repeats"], compile, True)
    log("export sizes and load times ...")
    results["export"] = section("export_sizes", TRAIN_PRESET, 0.8, p["export_repeats"])
    results["baselines"] = {"parameters": baseline.parameter_count(TRAIN_PRESET)}
    log("spkprune bench: digits dense vs ticket (train, imp, bench) ...")
    results["bench"] = bench_digits(threads, p["bench_repeats"])
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    results["machine"]["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in load)
    results["summary"] = summary(results, compile)
    return results


def summary(results: dict, compile: bool) -> dict:
    mem = results["memory"]
    out = {
        "train_speedup": results["train"]["speedup"],
        "train_memory_ratio": _ratio(mem["fast"]["step_mb"], mem["plain"]["step_mb"]),
        "eval_speedup": results["eval"]["speedup"],
        "keep07_gain": results["eval"]["keep07_gain"],
        "mask_overhead": results["masks"]["overhead"],
    }
    if compile:
        out["train_speedup_compiled"] = results["train"]["compiled_speedup"]
        out["train_memory_ratio_compiled"] = _ratio(mem[cases.COMPILED_PATH]["step_mb"], mem["plain"]["step_mb"])
        out["eval_speedup_compiled"] = results["eval"]["compiled_speedup"]
    for key in ("train", "eval"):
        for path, ratio in results[key].get("vs_spikingjelly", {}).items():
            out[f"{key} {path} vs {baseline.NAME}"] = ratio
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches (< 2 minutes)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd fast paths")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads in every section (default: "
                        "PyTorch's)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown report to write")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    start = time.perf_counter()
    results = run(args.quick, args.compile, args.threads)
    seconds = time.perf_counter() - start
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + (" --compile" if args.compile else "")
    command += f" --threads {args.threads}" if args.threads is not None else ""
    Path(args.out).write_text(report(results, command, seconds) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out} ({seconds:.0f} s)")
    print(json.dumps(results["summary"], indent=2))
    return 0
