"""`spkprune ls`, `spkprune show REF` and `spkprune rm REF`: what the store holds, with lineage and metrics."""

from __future__ import annotations

import json
import sys

import pandas as pd
import typer

from spkprune.checkpoint import Checkpoint, load_artifact, load_checkpoint, tensor_summary, is_buffer_key
from spkprune.cli.app import app, readable_store, store_dir
from spkprune.cli.render import check_format, render_frame, stderr, stdout
from spkprune.errors import SpkpruneError
from spkprune.store import Artifact, CorruptRowError, Store, is_store_ref, parse_ref

FORMAT_HELP = "Output: table (for people), json, csv or md (for scripts)."


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _metric(meta: dict, key: str):
    metrics = meta.get("metrics") or {}
    return metrics.get(key)


def _sparsity(meta: dict):
    return (meta.get("sparsity") or {}).get("prunable")


def artifact_row(art: Artifact) -> dict:
    return {
        "ref": art.ref,
        "kind": art.kind,
        "arch": art.meta.get("arch"),
        "parent": art.parent,
        "sparsity": _sparsity(art.meta),
        "top1": _metric(art.meta, "top1"),
        "size": art.size,
        "created": art.created,
    }


def _for_people(row: dict) -> dict:
    out = {k: "" if v is None else v for k, v in row.items()}
    if row.get("sparsity") is not None:
        out["sparsity"] = f"{100 * row['sparsity']:.1f}%"
    if row.get("top1") is not None:
        out["top1"] = f"{row['top1']:.4g}"
    if "size" in row:
        out["size"] = human_size(row["size"])
    if row.get("created"):
        out["created"] = row["created"].replace("T", " ")[:19]
    return out


@app.command("ls")
def ls_command(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Only this name's tags (main, init, epoch-K, round-K, ...)."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """List the checkpoints in the store: reference, kind, preset, parent, sparsity, top-1, size, creation time."""
    check_format(fmt)
    store = readable_store(ctx)
    arts, corrupt = store.scan(name) if store else ([], [])
    if name and not arts and not corrupt:
        if store is None:
            raise SpkpruneError(f"no store at {store_dir(ctx)}; train or import a model first, or pass --store DIR")
        store.resolve(name)  # raises, naming what the store holds
    for err in corrupt:  # one bad row must not hide the others: name it and list the rest
        typer.echo(f"warning: {err} (left out of this listing)", err=True)
    rows = [artifact_row(a) for a in arts]
    columns = ["ref", "kind", "arch", "parent", "sparsity", "top1", "size", "created"]
    if fmt == "json":  # written directly: pandas' JSON rounds floats to 10 digits
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if fmt == "table":
        if not rows and not corrupt:
            typer.echo(f"store {store_dir(ctx)} holds no checkpoints yet (spkprune train / spkprune import)", err=True)
            return
        rows = [_for_people(r) for r in rows]
    render_frame(pd.DataFrame(rows, columns=columns), fmt, title=f"store {store_dir(ctx)}")


def _load_for_show(ref: str, store: Store | None) -> tuple[Checkpoint, Artifact | None]:
    if store is not None and is_store_ref(ref) and store.exists(*parse_ref(ref)):
        art = store.resolve(ref)
        return load_artifact(store, art), art
    return load_checkpoint(ref, store), None


def show_document(ref: str, store: Store | None) -> dict:
    """Everything `show` prints: artifact fields, metadata, lineage, metrics and per-tensor sparsity."""
    ckpt, art = _load_for_show(ref, store)
    doc: dict = {"ref": ckpt.ref}
    if art is not None:
        doc.update(kind=art.kind, sha256=art.sha256, size=art.size, created=art.created, parent=art.parent,
                   path=str(art.path))
        doc["lineage"] = _lineage_rows(store, art)
    else:
        doc.update(kind="file", parent=ckpt.meta.get("parent"), lineage=[])
    doc["meta"] = ckpt.meta
    doc["metrics"] = ckpt.meta.get("metrics") or {}
    doc["tensors"] = [r for r in tensor_summary(ckpt) if not is_buffer_key(r["key"])]
    return doc


def _lineage_rows(store: Store, art: Artifact) -> list[dict]:
    try:
        chain, external = store.lineage(art)
    except CorruptRowError as err:  # show the artifact itself; its lineage ends at the unreadable ancestor
        typer.echo(f"warning: the lineage of {art.ref} is cut short: {err}", err=True)
        return [{"ref": err.ref, "kind": "corrupt index row"}]
    return [artifact_row(a) for a in chain] + ([{"ref": external, "kind": "outside the store"}] if external else [])


@app.command("show")
def show_command(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME, NAME@TAG, a .safetensors file, an exported folder or hf://ORG/REPO."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP + " csv prints the per-tensor table."),
) -> None:
    """Show one checkpoint: all metadata, its lineage back to the root, metrics and per-tensor sparsity."""
    check_format(fmt)
    doc = show_document(ref, readable_store(ctx))
    tensors = pd.DataFrame(doc["tensors"], columns=["key", "shape", "dtype", "numel", "zeros", "pruned", "sparsity"])
    if fmt == "json":
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    elif fmt == "csv":
        render_frame(tensors, "csv")
    else:
        _render_sections(doc, tensors, fmt)


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out.append({"field": prefix, "value": value if isinstance(value, (str, int, float)) or value is None
                    else json.dumps(value)})


def _render_sections(doc: dict, tensors: pd.DataFrame, fmt: str) -> None:
    fields: list = []
    top = {k: doc[k] for k in ("ref", "kind", "parent", "created", "size", "sha256", "path") if k in doc}
    _flatten("", top, fields)
    _flatten("", {k: v for k, v in doc["meta"].items() if k not in ("parent", "created")}, fields)
    people = [{"field": f["field"], "value": "" if f["value"] is None else str(f["value"])} for f in fields]
    render_frame(pd.DataFrame(people, columns=["field", "value"]), fmt, title=f"checkpoint {doc['ref']}")
    chain = [_for_people(r) for r in doc["lineage"]]
    if chain:
        render_frame(pd.DataFrame(chain), fmt, title="lineage (parent first, back to the root)")
    shown = tensors.assign(
        pruned=tensors["pruned"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        sparsity=tensors["sparsity"].map(lambda v: "" if pd.isna(v) else f"{100 * v:.1f}%"),
    )
    render_frame(shown, fmt, title="tensors (pruned = mask False; zeros = exact zeros)")
    if fmt == "table" and not chain and doc["kind"] != "file":
        stdout.print("lineage: a root (no parent)")


@app.command("rm")
def rm_command(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME@TAG to remove (a bare NAME means NAME@main)."),
) -> None:
    """Remove one tag from the store (its file goes too unless another tag shares the same weights)."""
    store = readable_store(ctx)
    if store is None:
        raise SpkpruneError(f"no store at {store_dir(ctx)}; pass --store DIR")
    removed = store.delete(*parse_ref(ref))
    stderr.print(f"removed {removed}")
