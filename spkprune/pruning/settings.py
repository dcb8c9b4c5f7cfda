"""The settings of an IMP run: everything that decides its results, stored in every round and compared on re-run."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M

_REWIND_RE = re.compile(r"^(init|epoch:(\d+)|iter:(\d+))$")


@dataclass(frozen=True)
class ImpSettings:
    """Everything that decides an IMP run's results; stored in every round and compared on re-run."""

    rounds: int
    target: float | None = 0.9
    rate: float | None = None
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    rewind: str = "init"
    epochs_per_round: int | None = None  # None: as many epochs as the dense run
    search_timesteps: int | None = None
    seed: int | None = None  # None: the dense run's seed

    def validate(self) -> "ImpSettings":
        if self.rounds < 1:
            raise SpkpruneError(f"--rounds must be at least 1, got {self.rounds}")
        if self.target is not None:
            M.check_target(self.target)
        M.sparsity_schedule(self.rounds, target=self.target, rate=self.rate)
        if self.scope not in M.SCOPES:
            raise SpkpruneError(f"unknown --scope {self.scope!r}; choose global or layerwise")
        parse_rewind(self.rewind)
        if self.epochs_per_round is not None and self.epochs_per_round < 1:
            raise SpkpruneError(f"--epochs-per-round must be at least 1, got {self.epochs_per_round}")
        if self.search_timesteps is not None and self.search_timesteps < 1:
            raise SpkpruneError(f"--search-timesteps must be at least 1, got {self.search_timesteps}")
        return self

    def levels(self) -> list[float]:
        return M.sparsity_schedule(self.rounds, target=self.target, rate=self.rate)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        return data


def parse_rewind(spec: str) -> tuple[str, int]:
    """`init` -> ("init", 0); `epoch:K` -> ("epoch", K); `iter:K` -> ("iter", K)."""
    match = _REWIND_RE.match(spec or "")
    if not match:
        raise SpkpruneError(f"invalid --rewind {spec!r}; use init, epoch:K or iter:K (K a whole number)")
    if spec == "init":
        return "init", 0
    kind, value = spec.split(":")
    if int(value) < 1:
        raise SpkpruneError(f"--rewind {spec}: K must be at least 1 (use init for the initial weights)")
    return kind, int(value)
