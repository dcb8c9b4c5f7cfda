"""Command-line interface. Each subcommand lives in its own small module and registers itself on `app`."""

from spkprune.cli.app import app, main  # noqa: F401
from spkprune.cli import (  # noqa: F401  (importing registers the commands)
    train,
    import_cmd,
    evaluate,
    store_cmds,
    imp,
    select_tokens,
    flops,
    export,
    run,
    compact,
    bench,
    list_models,
    sweep,
    sensitivity,
)
