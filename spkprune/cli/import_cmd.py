"""`spkprune import PATH --arch PRESET --name NAME`: bring an original Spikformer checkpoint into the store."""

from __future__ import annotations

from pathlib import Path

import typer

from spkprune.checkpoint import prepare_import, save_checkpoint
from spkprune.cli.app import app, writable_store
from spkprune.cli.render import stderr, stdout
from spkprune.store import parse_ref


@app.command("import")
def import_command(
    ctx: typer.Context,
    path: Path = typer.Argument(
        ...,
        help="Checkpoint of the original Spikformer code: .pth / .pth.tar (timm's saver, the DVS script, "
        "or a bare state_dict) or .safetensors.",
        show_default=False,
    ),
    arch: str = typer.Option(..., "--arch", help="Preset the weights belong to (see `spkprune.list_models()`)."),
    name: str = typer.Option(..., "--name", help="Name to store it under."),
    tag: str = typer.Option("main", "--tag", help="Tag to store it under (`NAME@TAG`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace NAME@TAG if it already exists."),
) -> None:
    """Import an original Spikformer checkpoint: checks every key and shape against the preset, then stores it.

    Pickled files are read with torch.load(weights_only=True): only plain tensor dictionaries are accepted.
    """
    parse_ref(f"{name}@{tag}")
    ckpt = prepare_import(path, arch)  # everything is validated before the store is touched
    store = writable_store(ctx)
    art = save_checkpoint(store, name, tag, ckpt, replace=overwrite)
    stderr.print(f"imported {path} ({len(ckpt.state_dict)} tensors, preset {arch}) into {store.root}")
    stdout.print(art.ref)
