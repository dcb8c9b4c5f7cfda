"""Hugging Face Hub push: an exported folder uploaded in one commit (pulling `hf://` refs is spkprune.checkpoint.hub).

The token is whatever huggingface_hub finds (HF_TOKEN, the token file of `hf auth login`); spkprune never reads,
prints or stores it. Every failure becomes one SpkpruneError line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spkprune.checkpoint.hub import check_repo_id, describe_hub_error, hub_errors, hub_unreachable, quiet_hub_logs
from spkprune.errors import SpkpruneError

__all__ = ["PushResult", "check_repo_id", "folder_files", "push_folder"]


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)
    commit_url: str | None = None
    dry_run: bool = False


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every file below `folder`, sorted."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_folder(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    commit_message: str = "Upload spkprune export",
) -> PushResult:
    """Create the repo if needed (and the branch `revision`), then upload the folder in one commit.

    `dry_run` lists what would be uploaded and contacts nothing. The local folder is never modified. Offline
    (HF_HUB_OFFLINE=1, or no connection to the endpoint within a second or so) it fails at once, in one line.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise SpkpruneError(f"{folder} is not a folder; export first with `spkprune export REF --out DIR`")
    result = PushResult(repo_id, revision, folder_files(folder), dry_run=dry_run)
    if dry_run:
        return result
    where = f"{repo_id}@{revision}" if revision else repo_id
    problem = _offline_problem()
    if problem:
        raise SpkpruneError(f"push to {where} failed: {problem}; the export in {folder} is intact")
    from huggingface_hub import HfApi  # slow to import; a dry run and a plain export never need it

    try:
        with quiet_hub_logs():
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True, private=private)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message
            )
    except hub_errors() as err:
        raise SpkpruneError(f"push to {where} failed: {describe_hub_error(err)}; the export in {folder} is intact") from None
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    return result


def _offline_problem() -> str | None:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set, so nothing can be sent to the Hub — unset it to push"
    unreachable = hub_unreachable()
    return unreachable and f"{unreachable} — check the network connection and HF_ENDPOINT"
