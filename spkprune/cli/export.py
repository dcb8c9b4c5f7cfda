"""`spkprune export REF --out DIR`: a Hub-ready folder, optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.render import render_frame, stderr
from spkprune.errors import SpkpruneError


def _size(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.2f} MiB"


def _check_choice(value: str, option: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SpkpruneError(f"unknown {option} {value!r}; choose {' or '.join(allowed)}")
    return value


def _check_push_options(push_to_hub: str | None, revision: str | None, private: bool, dry_run: bool) -> None:
    if push_to_hub is None:
        given = [name for name, on in (("--revision", revision), ("--private", private), ("--dry-run", dry_run)) if on]
        if given:
            raise SpkpruneError(f"{', '.join(given)} only apply to a push: add --push-to-hub ORG/REPO")
    else:
        from spkprune.export.hub import check_repo_id

        check_repo_id(push_to_hub)


@app.command("export")
def export_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Checkpoint: NAME[@TAG] in the store, a .safetensors file, a folder or hf://ORG/REPO[@REV]."),
    out: Path = typer.Option(..., "--out", help="Folder to write (refused if it exists and is not empty, unless --overwrite)."),
    fmt: str = typer.Option("dense", "--format", help="dense: model.safetensors with the original key names; "
                            "sparse: model.sparse.safetensors (bitmask/CSR + kept values)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (exact) or float16 (half the bytes, lossy)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder (only once the new export is complete)."),
    push_to_hub: str = typer.Option(None, "--push-to-hub", help="Upload the folder to this Hub repository, ORG/REPO, in one commit."),
    revision: str = typer.Option(None, "--revision", help="Branch to push to (created if missing), e.g. round-3."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repository as private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what --push-to-hub would upload; contact nothing."),
) -> None:
    """Write a Hub-ready folder (weights, config.json, README.md model card) and optionally push it."""
    from spkprune.export.exporter import export_checkpoint
    from spkprune.export.hub import push_folder
    from spkprune.store import Store

    _check_choice(fmt, "--format", ("dense", "sparse"))
    _check_choice(dtype, "--dtype", ("float32", "float16"))
    _check_push_options(push_to_hub, revision, private, dry_run)
    root = store_dir(ctx)
    store = Store.open(root, create=False) if root.exists() else None
    result = export_checkpoint(ref, out, store=store, fmt=fmt, dtype=dtype, overwrite=overwrite,
                               repo_id=push_to_hub, revision=revision)
    _render_export(result)
    if push_to_hub is None:
        return
    pushed = push_folder(result.folder, push_to_hub, revision=revision, private=private, dry_run=dry_run,
                         commit_message=f"spkprune export of {ref} ({fmt}, {dtype})")
    target = push_to_hub + (f"@{revision}" if revision else "")
    if dry_run:
        total = sum(size for _, size in pushed.files)
        for name, size in pushed.files:
            stderr.print(f"would upload {name} ({_size(size)})")
        stderr.print(f"dry run: would upload {len(pushed.files)} files ({_size(total)}) to {target}; nothing was sent")
    else:
        stderr.print(f"pushed {len(pushed.files)} files to {target}: {pushed.commit_url}")


def _render_export(result) -> None:
    frame = pd.DataFrame([{"file": name, "bytes": size, "size": _size(size)} for name, size in result.files])
    extra = {"folder": str(result.folder), "format": f"{result.format} ({result.dtype})"}
    if result.sparsity is not None:
        extra["sparsity (prunable)"] = f"{100 * result.sparsity:.1f}%"
    if result.ratio is not None:
        extra["weights vs dense float32"] = f"{100 * result.ratio:.1f}% ({_size(result.weights_bytes)} of " \
                                            f"{_size(result.dense_float32_bytes)})"
    if result.dtype != "float32":
        extra["note"] = f"{result.dtype} is lossy: loading gives the {result.dtype}-rounded weights"
    render_frame(frame, "table", title=f"exported to {result.folder}", extra=extra)
