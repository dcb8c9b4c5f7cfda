"""The benchmark entry point: `python -m benchmarks [--quick] [--compile] [--out docs/benchmarks.md]`.

Everything is measured on this machine in one run, each section in a fresh Python process, with warm-up and
interleaved repeats (plain and fast alternate, so load from other processes hits both alike); reported figures are
medians, ratios are medians of per-repeat ratios. Peak memory comes from a fresh process per configuration (max RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import cases
from benchmarks.timing import interleaved, machine, median, paired_ratio

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PRESET = "spikformer-4-384-cifar10"
DIGITS_PRESET = "spikformer-2-64-digits"
KEEPS = (0.9, 0.7, 0.5)

FULL = dict(train_batch=16, train_repeats=5, digits_batch=64, digits_repeats=7, eval_batch=32, eval_repeats=7,
            mask_repeats=8, export_repeats=5, memory_steps=2)
QUICK = dict(train_batch=4, train_repeats=2, digits_batch=32, digits_repeats=3, eval_batch=8, eval_repeats=2,
             mask_repeats=3, export_repeats=2, memory_steps=1)

TARGETS = {  # name: (measured key, comparison, bound)
    "training step speed-up vs plain (4-384)": ("train_speedup", ">=", 1.5),
    "peak training memory vs plain (4-384)": ("train_memory_ratio", "<=", 0.5),
    "eval speed-up vs plain (4-384, dense)": ("eval_speedup", ">=", 2.0),
    "eval throughput keep 0.7 / keep 1.0": ("keep07_gain", ">=", 1.2),
    "mask overhead per training step": ("mask_overhead", "<", 0.05),
    "training step speed-up vs plain with --compile (4-384)": ("train_speedup_compiled", ">=", 1.5),
    "peak training memory vs plain with --compile (4-384)": ("train_memory_ratio_compiled", "<=", 0.5),
    "eval speed-up vs plain with --compile (4-384, dense)": ("eval_speedup_compiled", ">=", 2.0),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def training_paths(compile: bool) -> tuple[str, ...]:
    return cases.PATHS + ((cases.COMPILED_PATH,) if compile else ())


def train_throughput(preset: str, batch: int, repeats: int, compile: bool, profile: bool = False) -> dict:
    steps = {path: cases.training_setup(preset, batch, path) for path in training_paths(compile)}
    times = interleaved(steps, warmup=1, repeats=repeats)
    rows = [{"path": name, "images_per_s": batch / median(t), "step_s": median(t)} for name, t in times.items()]
    result = {"rows": rows, "speedup": paired_ratio(times["plain"], times["fast"])}
    if compile:
        result["compiled_speedup"] = paired_ratio(times["plain"], times[cases.COMPILED_PATH])
    if profile:
        result["dense"] = {path: cases.dense_time(steps[path]) for path in ("plain", _fastest(steps))}
    return result


def _fastest(paths: dict) -> str:
    return cases.COMPILED_PATH if cases.COMPILED_PATH in paths else "fast"


def memory_env() -> dict[str, str]:
    """glibc serves allocations of 1 MiB and more from mmap and unmaps them when freed, so max RSS follows the live
    tensors instead of what the heap keeps after fragmentation (without it the same step reads 2x higher on its
    second repeat, for every path)."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))


def train_memory(preset: str, batch: int, steps: int, compile: bool) -> dict[str, dict]:
    out = {}
    for path in training_paths(compile):
        cmd = [sys.executable, "-m", "benchmarks.memory", preset, str(batch), path, str(steps)]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, env=memory_env())
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


def eval_throughput(preset: str, batch: int, repeats: int, compile: bool) -> dict:
    passes = cases.eval_setups(preset, batch, KEEPS, compile=compile)
    times = interleaved(passes, warmup=1, repeats=repeats)
    rows = [{"path": name, "images_per_s": batch / median(t)} for name, t in times.items()]
    fastest = "fast keep 1.0 compiled" if compile else "fast keep 1.0"
    result = {"rows": rows, "speedup": paired_ratio(times["plain"], times["fast keep 1.0"]),
              "keep07_gain": paired_ratio(times["fast keep 1.0"], times["fast keep 0.7"]),
              "dense": {path: cases.dense_time(passes[path]) for path in ("plain", fastest)}}
    if compile:
        result["compiled_speedup"] = paired_ratio(times["plain"], times["fast keep 1.0 compiled"])
    return result


def in_fresh_process(section: str, *args) -> dict:
    """`section(*args)` in a new Python process (see `benchmarks.section`): every measurement starts from the same
    state, whatever ran before it (glibc's heap keeps what earlier sections grew, which changes later timings)."""
    cmd = [sys.executable, "-m", "benchmarks.section", section, json.dumps(args)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark section {section} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick: bool, compile: bool) -> dict:
    p = QUICK if quick else FULL
    results: dict = {"machine": machine(), "settings": p, "compile": compile}
    log(f"training {TRAIN_PRESET} batch {p['train_batch']} ...")
    results["train"] = in_fresh_process("train_throughput", TRAIN_PRESET, p["train_batch"], p["train_repeats"],
                                        compile, True)
    log(f"training {DIGITS_PRESET} batch {p['digits_batch']} ...")
    results["train_digits"] = in_fresh_process("train_throughput", DIGITS_PRESET, p["digits_batch"],
                                               p["digits_repeats"], compile)
    log("peak training memory (fresh processes) ...")
    results["memory"] = train_memory(TRAIN_PRESET, p["train_batch"], p["memory_steps"], compile)
    results["memory_digits"] = train_memory(DIGITS_PRESET, p["digits_batch"], p["memory_steps"], compile)
    log("mask overhead ...")
    results["masks"] = in_fresh_process("mask_overhead", DIGITS_PRESET if quick else TRAIN_PRESET,
                                        p["digits_batch"] if quick else p["train_batch"], p["mask_repeats"])
    log(f"eval {TRAIN_PRESET} batch {p['eval_batch']} ...")
    results["eval"] = in_fresh_process("eval_throughput", TRAIN_PRESET, p["eval_batch"], p["eval_repeats"], compile)
    log("export sizes and load times ...")
    results["export"] = in_fresh_process("export_sizes", TRAIN_PRESET, 0.8, p["export_repeats"])
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    results["machine"]["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in load)
    mem = results["memory"]
    results["summary"] = {
        "train_speedup": results["train"]["speedup"],
        "train_memory_ratio": _ratio(mem["fast"]["step_mb"], mem["plain"]["step_mb"]),
        "eval_speedup": results["eval"]["speedup"],
        "keep07_gain": results["eval"]["keep07_gain"],
        "mask_overhead": results["masks"]["overhead"],
    }
    if compile:
        results["summary"]["train_speedup_compiled"] = results["train"]["compiled_speedup"]
        results["summary"]["train_memory_ratio_compiled"] = _ratio(
            mem[cases.COMPILED_PATH]["step_mb"], mem["plain"]["step_mb"])
        results["summary"]["eval_speedup_compiled"] = results["eval"]["compiled_speedup"]
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# ---- report -------------------------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


def report(results: dict, command: str, seconds: float) -> str:
    s = results["summary"]
    parts = [
        "# Benchmarks",
        "",
        "Written by the benchmark entry point; do not edit by hand. Reproduce with:",
        "",
        f"```\n{command}\n```",
        "",
        f"One run, {seconds:.0f} s, each section in a fresh Python process. Medians over interleaved repeats "
        "(plain and fast alternate), after one warm-up each; ratios are medians of per-repeat ratios. *plain* = "
        "spikingjelly's `LIFNode` operator at every site, separate BatchNorm modules and NCHW images as in the "
        "original code, `torch.no_grad`; *fast* = for training the lean LIF, BatchNorm + LIF fused into one autograd "
        "function that keeps only the BatchNorm input (q, k and v as one product and one such site), bool spike "
        "packing, max-pooling that keeps only its indices and channels-last patch splitting "
        "(`prepare_for_training`); *fast compiled* = the same with its neuron kernels through `torch.compile`; for "
        "eval the lean LIF + folded BatchNorm + channels-last patch splitting + batches run in pieces of at most "
        "32 MiB activations + `torch.inference_mode` (`prepare_for_inference`, with `compile=True` one fused neuron "
        "kernel). See docs/performance.md for what each does.",
        "",
        "## Machine",
        "",
        _table(["", ""], [[k, v] for k, v in results["machine"].items()]),
        "",
        "## Targets",
        "",
        _table(["target", "bound", "measured", "met"], [
            [name, f"{op} {bound:g}", f"{s[key]:.3f}", "yes" if _met(s[key], op, bound) else "**no**"]
            for name, (key, op, bound) in TARGETS.items() if key in s
        ]),
        "",
    ]
    for key, preset in (("train", TRAIN_PRESET), ("train_digits", DIGITS_PRESET)):
        batch = results["settings"]["train_batch" if key == "train" else "digits_batch"]
        parts += [f"## Training step: {preset}, batch {batch}", "",
                  _table(["path", "images/s", "s/step"],
                         [[r["path"], f"{r['images_per_s']:.2f}", f"{r['step_s']:.3f}"] for r in results[key]["rows"]]),
                  "", f"Speed-up fast / plain: **{results[key]['speedup']:.2f}x**"
                  + (f"; fast compiled / plain: **{results[key]['compiled_speedup']:.2f}x**"
                     if "compiled_speedup" in results[key] else ""), ""]
        if "dense" in results[key]:
            parts += [_ceiling(results[key]["dense"], "step"), ""]
    for key, preset in (("memory", TRAIN_PRESET), ("memory_digits", DIGITS_PRESET)):
        m = results[key]
        parts += [f"## Peak training memory: {preset} (fresh process per path, max RSS, "
                  "`MALLOC_MMAP_THRESHOLD_=1048576`)", "",
                  _table(["path", "baseline MB (model + optimizer)", "peak MB", "step MB (peak - baseline)"],
                         [[p, f"{v['base_mb']:.0f}", f"{v['peak_mb']:.0f}", f"{v['step_mb']:.0f}"] for p, v in m.items()]),
                  "", "; ".join(
                      f"step memory {path} / plain: **{_ratio(m[path]['step_mb'], m['plain']['step_mb']):.2f}** "
                      f"(peak RSS {m[path]['peak_mb'] / m['plain']['peak_mb']:.2f})" for path in m if path != "plain"
                  ), ""]
    mk = results["masks"]
    parts += ["## Weight-mask overhead (fast path, 80% layer-wise magnitude masks, MaskEnforcer as in fit)", "",
              _table(["", "s/step"], [[k, f"{v:.3f}"] for k, v in mk["times"].items()]), "",
              f"MaskEnforcer (masking the gradients before the optimizer step, zeroing weights and AdamW moments "
              f"after it): **{1000 * mk['enforcer_s']:.1f} ms** per step, overhead **{100 * mk['overhead']:.1f}%** of "
              f"the step without masks. The whole steps, with / without masks: {mk['step_ratio']:.3f} (median of "
              "per-repeat ratios; steps move by several percent between repeats).", ""]
    ev = results["eval"]
    parts += [f"## Eval: {TRAIN_PRESET}, batch {results['settings']['eval_batch']}", "",
              _table(["path", "images/s"], [[r["path"], f"{r['images_per_s']:.2f}"] for r in ev["rows"]]), "",
              f"Speed-up fast / plain: **{ev['speedup']:.2f}x**; keep 0.7 / keep 1.0: **{ev['keep07_gain']:.2f}x** "
              "(keep r = cumulative ratios r, r^2, r^3 before blocks 1, 2, 3; tokens gathered)", "",
              _ceiling(ev["dense"], "pass"), ""]
    parts += [f"## Export: {TRAIN_PRESET}, 80% layer-wise magnitude sparsity", "",
              _table(["format", "bytes", "MB", "load s (median)"],
                     [[r["format"], r["bytes"], f"{r['bytes'] / 1e6:.2f}", f"{r['load_s']:.3f}"]
                      for r in results["export"]]), ""]
    return "\n".join(parts)


def _ceiling(dense: dict[str, dict], what: str) -> str:
    (plain, p), (fast, f) = dense.items()
    return (f"Dense float32 matrix products and convolutions (one profiled call each): {p['dense_s']:.2f} s of the "
            f"plain {what}'s {p['total_s']:.2f} s ({100 * p['dense_s'] / p['total_s']:.0f}%), {f['dense_s']:.2f} s of "
            f"the {fast} {what}'s {f['total_s']:.2f} s (channels-last convolutions). A path with the {fast} dense "
            f"work and nothing else would be at most **{p['total_s'] / f['dense_s']:.2f}x** faster than plain.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches (< 2 minutes)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd fast paths")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown report to write")
    parser.add_argument("--json", default=None, help="also write the raw results as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(args.quick, args.compile)
    seconds = time.perf_counter() - start
    command = "python -m benchmarks" + (" --quick" if args.quick else "") + (" --compile" if args.compile else "")
    Path(args.out).write_text(report(results, command, seconds) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out} ({seconds:.0f} s)")
    print(json.dumps(results["summary"], indent=2))
    return 0
