"""`spkprune select-tokens REF --keep 0.7 --name NAME`: attach and fine-tune the spiking token selector;
`--analyze` writes the firing-rate pictures and the kept-vs-dropped table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.render import check_format, render_frame, stderr
from spkprune.errors import SpkpruneError

FORMAT_HELP = "Output: table (for people), json, csv or md (for scripts)."


def parse_keep(text: str) -> float | list[float]:
    """`0.7` (cumulative 0.7, 0.49, 0.343, ...) or `0.7,0.5,0.3` (one cumulative ratio per location)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpkpruneError(f"--keep {text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise SpkpruneError("--keep needs a ratio in (0, 1], e.g. --keep 0.7")
    return values[0] if len(values) == 1 else values


def parse_locations(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpkpruneError(f"--locations {text!r} must be block indices like 1,2,3") from None


def _open_store(ctx: typer.Context, create: bool):
    from spkprune.store import Store

    root = store_dir(ctx)
    if not create and not root.exists():
        return None
    return Store.open(root, create=create)


@app.command("select-tokens")
def select_tokens_command(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Checkpoint to start from: NAME[@TAG], a .safetensors file, a folder or hf://."),
    keep: str = typer.Option("0.7", "--keep", help="Keep ratio rho (cumulative rho, rho^2, rho^3 of the tokens at the "
                             "locations) or one cumulative ratio per location, e.g. 0.9,0.7,0.5."),
    name: str = typer.Option(None, "--name", help="Store the fine-tuned model as NAME (required unless --analyze)."),
    locations: str = typer.Option(None, "--locations", help="Blocks a selector sits before (default: all but the "
                                  "first, e.g. 1,2,3 for 4 blocks)."),
    scorer: str = typer.Option(None, "--scorer", help="learned (the paper's MLP + Gumbel-softmax), firing-rate "
                               "(training-free) or random (control). Default: learned; firing-rate for --analyze of "
                               "a dense checkpoint."),
    epochs: int = typer.Option(None, "--epochs", help="Fine-tuning epochs (default 10; 0 evaluates a firing-rate "
                               "or random selector without fine-tuning)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default: 0.2 x the checkpoint's training lr)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Training batch size (default: the checkpoint's)."),
    teacher: str = typer.Option(None, "--teacher", help="Frozen teacher for distillation (default: REF itself, "
                                "without selectors)."),
    ratio_weight: float = typer.Option(2.0, "--ratio-weight", help="Weight of the keep-ratio MSE (divided by the "
                                       "number of selectors, as in the reference code)."),
    distill_weight: float = typer.Option(0.5, "--distill-weight", help="Weight of the KL distillation from the "
                                         "teacher (0 turns it off)."),
    init: str = typer.Option("firing-rate", "--init", help="Learned scorer's start: firing-rate (its MLP first "
                             "ranks tokens by firing rate, calibrated to the keep ratio) or random (the paper's "
                             "initialisation)."),
    selector_lr_scale: float = typer.Option(None, "--selector-lr-scale", help="Learning-rate factor of the learned "
                                            "selector's MLP (default 0.1 with --init firing-rate, 1 with random)."),
    dataset: str = typer.Option(None, "--dataset", help="Data set (default: the one REF was trained on)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Where the data set lives (not needed for digits)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the checkpoint's)."),
    analyze: bool = typer.Option(False, "--analyze", help="Write firing-rate and kept-token pictures (PNG) and the "
                                 "kept-vs-dropped table to --out (of the NAME result, or of REF without --name)."),
    out: Path = typer.Option(Path("token-analysis"), "--out", help="Folder for the --analyze pictures."),
    samples: int = typer.Option(512, "--samples", help="Test images the --analyze table averages over."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace NAME if it exists."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Attach the spiking token selector before chosen blocks and fine-tune with CE + keep-ratio + distillation.

    Prints the teacher's and the student's accuracy and the tokens each block sees; saves NAME with the selector's
    weights and configuration, the checkpoint's masks and its parent.
    """
    from spkprune.checkpoint import load_checkpoint

    check_format(fmt)
    if name is None and not analyze:
        raise SpkpruneError("give --name NAME to store the result (or --analyze to only draw the firing rates)")
    if samples < 1:
        raise SpkpruneError(f"--samples must be >= 1, got {samples}")
    keep_value, location_list = parse_keep(keep), parse_locations(locations)
    store = _open_store(ctx, create=name is not None)
    if name is not None:
        from spkprune.store import parse_ref

        parse_ref(f"{name}@main")
        if store.exists(name, "main") and not overwrite:
            raise SpkpruneError(f"{name}@main already exists in the store; choose another --name or pass --overwrite")
    source = load_checkpoint(ref, store)
    frame, extra, title = None, {}, ""
    analysed = source
    if name is not None:
        analysed, frame, extra, title = _finetune(
            store, source, name, overwrite, keep_value, location_list, scorer or "learned", epochs, lr, batch_size,
            teacher, ratio_weight, distill_weight, init, selector_lr_scale, dataset, data_dir, seed, fmt,
        )
    if analyze:
        selector = {"keep": keep_value, "scorer": scorer or "firing-rate"}
        if location_list:
            selector["locations"] = location_list
        table, pictures, table_title = _analyze(analysed, selector, dataset, data_dir, out, samples)
        if frame is None:
            frame, title, extra = table, table_title, {"pictures": pictures}
        elif fmt == "table":
            render_frame(table, fmt, title=table_title)
        else:
            extra["analysis"] = {"rows": table.to_dict(orient="records"), "pictures": pictures}
    render_frame(frame, fmt, title=title, extra=extra)


def _finetune(store, source, name, overwrite, keep, locations, scorer, epochs, lr, batch_size, teacher_ref,
              ratio_weight, distill_weight, init, selector_lr_scale, dataset, data_dir, seed, fmt):
    from spkprune.checkpoint import load_checkpoint, save_checkpoint
    from spkprune.selection import SelectionConfig, select_tokens

    selection = SelectionConfig(keep, locations, scorer, ratio_weight, distill_weight, init, selector_lr_scale)
    teacher = load_checkpoint(teacher_ref, store) if teacher_ref else None
    overrides = {"lr": lr, "batch_size": batch_size, "dataset": dataset, "data_dir": data_dir, "seed": seed}
    result = select_tokens(source, selection, epochs=epochs, teacher=teacher, train_overrides=overrides,
                           progress=fmt == "table")
    art = save_checkpoint(store, name, "main", result.checkpoint, parent=source.ref, replace=overwrite)
    stderr.print(f"saved {art.ref} (parent {source.ref})")
    teacher_top1, student_top1 = result.teacher_metrics["top1"], result.metrics["top1"]
    extra = {
        "ref": art.ref,
        "parent": source.ref,
        "scorer": scorer,
        "teacher_top1": teacher_top1,
        "student_top1": student_top1,
        "change_points": round(100 * (student_top1 - teacher_top1), 4),
    }
    located = set(result.checkpoint.meta["selector"]["locations"])
    rows = [
        {"block": block, "selector": block in located, "tokens": count, "fraction": count / result.model.num_tokens}
        for block, count in enumerate(result.tokens_per_block)
    ]
    title = f"{art.ref}: tokens per block ({scorer} selector)"
    return result.checkpoint, pd.DataFrame(rows), extra, title


def _analyze(ckpt, selector, dataset, data_dir, out, samples):
    from spkprune.selection import analysis_model, analyze_tokens, rate_table, sample_images, write_analysis

    model = analysis_model(ckpt, selector)
    train = ckpt.meta.get("train") or {}
    dataset = dataset or train.get("dataset") or model.config.dataset
    if not dataset:
        raise SpkpruneError(f"{ckpt.ref or 'the checkpoint'} records no data set; pass --dataset")
    images = sample_images(dataset, data_dir or train.get("data_dir"), samples, model.config.timesteps)
    analysis = analyze_tokens(model, images)
    paths = write_analysis(analysis, out)
    for path in paths.values():
        stderr.print(f"wrote {path}")
    title = f"firing rate of kept vs dropped tokens ({len(images)} {dataset} test images)"
    return rate_table(analysis), {k: str(v) for k, v in paths.items()}, title
