"""`spkprune select-tokens REF --keep 0.7 --name NAME`: attach and fine-tune the spiking token selector;
`--analyze` writes the firing-rate pictures and the kept-vs-dropped table."""

from __future__ import annotations

import typer

from spkprune.cli.app import app, readable_store, writable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.selection.jobs import run_select_tokens
from spkprune.selection.settings import SelectTokensSettings


@settings_command(app, "select-tokens", SelectTokensSettings)
def select_tokens_command(ctx: typer.Context, settings: SelectTokensSettings, fmt: str) -> None:
    """Attach the spiking token selector before chosen blocks and fine-tune with CE + keep-ratio + distillation.

    Prints the teacher's and the student's accuracy and the tokens each block sees; saves NAME with the selector's
    weights and configuration, the checkpoint's masks and its parent.
    """
    store = writable_store(ctx) if settings.name is not None else readable_store(ctx)
    outcome = run_select_tokens(store, settings, progress=fmt == "table", log=stderr.print)
    analysis = outcome.analysis
    if outcome.result is None:
        title = f"firing rate of kept vs dropped tokens ({analysis.images} {analysis.dataset} test images)"
        render_frame(analysis.table, fmt, title=title, extra={"pictures": _paths(analysis.pictures)})
        return
    extra = outcome.summary()
    if analysis is not None:
        if fmt == "table":
            render_frame(analysis.table, fmt, title=f"firing rate of kept vs dropped tokens ({analysis.images} "
                                                    f"{analysis.dataset} test images)")
        else:
            extra["analysis"] = {"rows": analysis.table.to_dict(orient="records"),
                                 "pictures": _paths(analysis.pictures)}
    title = f"{outcome.artifact.ref}: tokens per block ({outcome.scorer} selector)"
    render_frame(outcome.tokens_frame(), fmt, title=title, extra=extra)


def _paths(pictures: dict) -> dict[str, str]:
    return {key: str(path) for key, path in pictures.items()}
