"""The markdown report of a benchmark run (docs/benchmarks.md)."""

from __future__ import annotations

from benchmarks.baseline import NAME as SPIKINGJELLY

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

INTRO = (
    "Medians over interleaved repeats (every path of a section alternates with the others), after one warm-up each; "
    "ratios are medians of per-repeat ratios. *plain* = spikingjelly's `LIFNode` operator at every site of "
    "spkprune's model, separate BatchNorm modules and NCHW images as in the original code, `torch.no_grad`; "
    f"*{SPIKINGJELLY}* = the model a user would pick instead: spikingjelly 2.0's own "
    "`spikingjelly.activation_based.model.spikformer.Spikformer` with the same 4-384 CIFAR shapes (its q, k and v "
    "as one 1152-channel kernel-1 Conv1d, no biases on its token projections, attention in the order v (k^T q): "
    "N d^2 instead of N^2 d multiply-adds per head, the same result without a softmax), default neurons, reset "
    "before every call, logits averaged over T, `torch.no_grad` for eval; *fast* = for training the lean LIF, BatchNorm + LIF "
    "fused into one autograd function that keeps only the BatchNorm input (q, k and v as one product and one such "
    "site), bool spike packing, max-pooling that keeps only its indices and channels-last patch splitting "
    "(`prepare_for_training`); *fast compiled* = the same with its neuron kernels through `torch.compile`; for eval "
    "the lean LIF + folded BatchNorm + channels-last patch splitting + batches run in pieces of at most 32 MiB "
    "activations + `torch.inference_mode` (`prepare_for_inference`, with `compile=True` one fused neuron kernel). "
    "See docs/performance.md for what each does."
)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value: float, op: str, bound: float) -> bool:
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def report(results: dict, command: str, seconds: float) -> str:
    parts = [
        "# Benchmarks", "", "Written by the benchmark entry point; do not edit by hand. Reproduce with:", "",
        f"```\n{command}\n```", "", f"One run, {seconds:.0f} s, each section in a fresh Python process. " + INTRO, "",
        "## Machine", "", _table(["", ""], [[k, v] for k, v in results["machine"].items()]), "",
        "## Targets", "", _targets(results["summary"]), "",
    ]
    if "baselines" in results:
        parts += _baselines(results), ""
    parts += _training(results) + _memory(results) + _masks(results["masks"]) + _eval(results)
    parts += _export(results["export"])
    if "bench" in results:
        parts += _bench(results["bench"])
    return "\n".join(parts)


def _targets(summary: dict) -> str:
    return _table(["target", "bound", "measured", "met"], [
        [name, f"{op} {bound:g}", f"{summary[key]:.3f}", "yes" if _met(summary[key], op, bound) else "**no**"]
        for name, (key, op, bound) in TARGETS.items() if key in summary
    ])


def _baselines(results: dict) -> str:
    """Speed-ups of each spkprune path against both baselines, training and eval, side by side."""
    rows = []
    for section, fast_paths in (("train", ("fast", "fast compiled")),
                                ("eval", ("fast keep 1.0", "fast keep 1.0 compiled"))):
        against = results[section].get("vs_spikingjelly", {})
        plain = results[section].get("vs_plain", {})
        for path in fast_paths:
            if path in against:
                rows.append([section, path, f"{plain[path]:.2f}x", f"{against[path]:.2f}x"])
        if "plain" in against:
            rows.append([section, "plain", "1.00x", f"{against['plain']:.2f}x"])
    counts = results["baselines"]["parameters"]
    return "\n".join([
        f"## Against both baselines: {results['train']['preset']}", "",
        _table(["section", "path", "speed-up vs plain", f"speed-up vs {SPIKINGJELLY}"], rows), "",
        f"Parameters: spkprune's preset {counts[0]:,}, {SPIKINGJELLY} {counts[1]:,} (the same layer shapes; the "
        "difference is the biases of spkprune's token projections, as in the original code).",
    ])


def _training(results: dict) -> list[str]:
    parts = []
    for key in ("train", "train_digits"):
        section = results[key]
        parts += [f"## Training step: {section['preset']}, batch {section['batch']}", "",
                  _table(["path", "images/s", "s/step"],
                         [[r["path"], f"{r['images_per_s']:.2f}", f"{r['step_s']:.3f}"] for r in section["rows"]]),
                  "", _speedups(section), ""]
        if "dense" in section:
            parts += [_ceiling(section["dense"], "step"), ""]
    return parts


def _speedups(section: dict) -> str:
    lines = [f"{path} / plain: **{ratio:.2f}x**" for path, ratio in section["vs_plain"].items()]
    lines += [f"{path} / {SPIKINGJELLY}: **{ratio:.2f}x**" for path, ratio in section.get("vs_spikingjelly", {}).items()
              if path != "plain"]
    return "Speed-up " + "; ".join(lines)


def _memory(results: dict) -> list[str]:
    parts = []
    for key, preset in (("memory", results["train"]["preset"]), ("memory_digits", results["train_digits"]["preset"])):
        m = results[key]
        parts += [f"## Peak training memory: {preset} (fresh process per path, max RSS, "
                  "`MALLOC_MMAP_THRESHOLD_=1048576`)", "",
                  _table(["path", "baseline MB (model + optimizer)", "peak MB", "step MB (peak - baseline)"],
                         [[p, f"{v['base_mb']:.0f}", f"{v['peak_mb']:.0f}", f"{v['step_mb']:.0f}"] for p, v in m.items()]),
                  "", "; ".join(
                      f"step memory {path} / plain: **{_ratio(m[path]['step_mb'], m['plain']['step_mb']):.2f}** "
                      f"(peak RSS {m[path]['peak_mb'] / m['plain']['peak_mb']:.2f})" for path in m if path != "plain"
                  ), ""]
    return parts


def _masks(mk: dict) -> list[str]:
    return ["## Weight-mask overhead (fast path, 80% layer-wise magnitude masks, MaskEnforcer as in fit)", "",
            _table(["", "s/step"], [[k, f"{v:.3f}"] for k, v in mk["times"].items()]), "",
            f"MaskEnforcer (masking the gradients before the optimizer step, zeroing weights and AdamW moments "
            f"after it): **{1000 * mk['enforcer_s']:.1f} ms** per step, overhead **{100 * mk['overhead']:.1f}%** of "
            f"the step without masks. The whole steps, with / without masks: {mk['step_ratio']:.3f} (median of "
            "per-repeat ratios; steps move by several percent between repeats).", ""]


def _eval(results: dict) -> list[str]:
    ev = results["eval"]
    return [f"## Eval: {ev['preset']}, batch {ev['batch']}", "",
            _table(["path", "images/s"], [[r["path"], f"{r['images_per_s']:.2f}"] for r in ev["rows"]]), "",
            _speedups(ev) + f"; keep 0.7 / keep 1.0: **{ev['keep07_gain']:.2f}x** (keep r = cumulative ratios r, "
            "r^2, r^3 before blocks 1, 2, 3; tokens gathered)", "", _ceiling(ev["dense"], "pass"), ""]


def _export(rows: list[dict]) -> list[str]:
    return ["## Export: spikformer-4-384-cifar10, 80% layer-wise magnitude sparsity", "",
            _table(["format", "bytes", "MB", "load s (median)"],
                   [[r["format"], r["bytes"], f"{r['bytes'] / 1e6:.2f}", f"{r['load_s']:.3f}"] for r in rows]), ""]


def _bench(section: dict) -> list[str]:
    doc = section["bench"]
    rows = [[r["ref"], r["timesteps"], r["batch_size"], f"{r['latency_ms']:.2f}", f"{r['latency_p90_ms']:.2f}",
             f"{r['throughput']:.1f}", f"{r['speedup']:.3f}",
             "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}",
             f"{r['dense_macs'] / 1e6:.2f}", f"{r['nonzero_macs'] / 1e6:.2f}"] for r in doc["rows"]]
    commands = "\n".join(f"spkprune --store STORE {c.removeprefix('spkprune ')}" for c in section["commands"])
    return [
        "## `spkprune bench`: a digits model against its 50% lottery ticket", "",
        f"```\n{commands}\n```", "",
        _table(["ref", "T", "batch", "latency ms (batch 1)", "p90 ms", "images/s", "speed-up", "peak MB",
                "dense MMAC", "nonzero MMAC"], rows), "",
        f"Peak memory: {doc['peak_memory']}. The ticket (half of every prunable weight zeroed by one IMP round, "
        "from a dense model trained for 5 batches) runs at about the dense model's speed: its zeros are still "
        "stored and multiplied, so only the counted nonzero MACs drop. Structured compaction (removing whole heads, "
        "channels and MLP units) is what makes a pruned model faster; `spkprune bench` measures it the same way.", "",
    ]


def _ceiling(dense: dict[str, dict], what: str) -> str:
    (plain, p), (fast, f) = dense.items()
    return (f"Dense float32 matrix products and convolutions (one profiled call each): {p['dense_s']:.2f} s of the "
            f"plain {what}'s {p['total_s']:.2f} s ({100 * p['dense_s'] / p['total_s']:.0f}%), {f['dense_s']:.2f} s of "
            f"the {fast} {what}'s {f['total_s']:.2f} s (channels-last convolutions). A path with the {fast} dense "
            f"work and nothing else would be at most **{p['total_s'] / f['dense_s']:.2f}x** faster than plain.")
