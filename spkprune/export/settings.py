"""The settings of `spkprune export`, declared once (see spkprune.settings)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import field_validator, model_validator

from spkprune.settings import Settings, option

_REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
_BAD_REVISION = re.compile(r"(\.\.|[\s~^:?*\[\\]|@\{|^[/.]|[/.]$|\.lock$|//)")


class ExportSettings(Settings):
    """`spkprune export`: a Hub-ready folder (weights, config.json, README.md model card), optionally pushed."""

    ref: str = option(..., "Checkpoint: NAME[@TAG] in the store, a .safetensors file, a folder or hf://ORG/REPO[@REV].",
                      argument=True, recipe="from", ref=True)
    out: Path = option(..., "Folder to write (refused if it exists and is not empty, unless --overwrite).",
                       identity=False)
    format: Literal["dense", "sparse"] = option("dense", "dense: model.safetensors with the original key names; "
                                                "sparse: model.sparse.safetensors (bitmask/CSR + kept values).")
    dtype: Literal["float32", "float16"] = option("float32", "float32 (exact) or float16 (half the bytes, lossy).")
    overwrite: bool = option(False, "Replace a non-empty --out folder (only once the new export is complete).",
                             flag="--overwrite", recipe=None)
    push_to_hub: Optional[str] = option(None, "Upload the folder to this Hub repository, ORG/REPO, in one commit.",
                                        pattern=_REPO_ID)
    revision: Optional[str] = option(None, "Branch to push to (created if missing), e.g. round-3.")
    private: bool = option(False, "Create the Hub repository as private.", flag="--private")
    dry_run: bool = option(False, "List what --push-to-hub would upload; contact nothing.", flag="--dry-run")

    @field_validator("revision")
    @classmethod
    def _branch_name(cls, revision: Optional[str]) -> Optional[str]:
        if revision is not None and (not revision or _BAD_REVISION.search(revision)):
            raise ValueError("must be a valid branch name (no spaces, '..', '~^:?*[\\', leading or trailing '/' or '.')")
        return revision

    @model_validator(mode="after")
    def _push_options_need_a_push(self):
        if self.push_to_hub is None:
            given = [flag for flag, on in (("--revision", self.revision), ("--private", self.private),
                                           ("--dry-run", self.dry_run)) if on]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to a push: add --push-to-hub ORG/REPO")
        return self
