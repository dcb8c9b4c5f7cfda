"""`spkprune imp` as a library call: settings in, the report of every round out."""

from __future__ import annotations

from typing import Callable

from spkprune.paths import check_output_file
from spkprune.pruning.imp import run_imp
from spkprune.pruning.settings import ImpCommandSettings
from spkprune.store import Store
from spkprune.training import distributed

Log = Callable[[str], None]


def run_imp_command(store: Store, settings: ImpCommandSettings, *, progress: bool = True,
                    log: Log = lambda message: None):
    """Find the lottery ticket `settings` describe (resumable, under torchrun too); returns the ImpReport."""
    if settings.plot is not None:
        check_output_file(settings.plot, "--plot")
    distributed.init_distributed()
    try:
        return run_imp(
            store, settings.ref, settings.name, settings.run_settings(), control=settings.control,
            resume=settings.resume, progress=progress, plot=settings.plot, log=log,
        )
    finally:
        distributed.shutdown()
