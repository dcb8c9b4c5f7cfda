"""Hugging Face Hub references, `hf://ORG/REPO[@REVISION]`: parse them and download an exported folder.

The token is whatever huggingface_hub finds (HF_TOKEN, the token file of `hf auth login`); spkprune never reads,
prints or stores it. Every failure becomes one SpkpruneError line. Pushing lives above, with the export.
huggingface_hub is imported inside the functions that use it: it is slow to import and most commands never need it.
"""

from __future__ import annotations

import re
from pathlib import Path

from spkprune.checkpoint.folder import read_config, weight_files
from spkprune.checkpoint.formats import CARD_FILE, CONFIG_FILE
from spkprune.errors import SpkpruneError

HF_PREFIX = "hf://"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HINTS = {
    401: "check HF_TOKEN or run `hf auth login`",
    403: "the token cannot write there: use a token with write access to that organisation",
    404: "check the repository id and revision, and that the token can see it",
}


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_RE.match(repo_id) or ".." in repo_id:
        raise SpkpruneError(f"invalid Hub repository {repo_id!r}: write ORG/REPO (letters, digits, - _ .)")
    return repo_id


def parse_hf_ref(ref: str) -> tuple[str, str | None]:
    """`hf://ORG/REPO[@REVISION]` -> (repo_id, revision or None)."""
    if not ref.startswith(HF_PREFIX):
        raise SpkpruneError(f"{ref!r} is not a Hub reference: write hf://ORG/REPO or hf://ORG/REPO@REVISION")
    repo_id, sep, revision = ref[len(HF_PREFIX):].partition("@")
    if sep and not revision:
        raise SpkpruneError(f"{ref!r} has an empty revision: write hf://ORG/REPO@REVISION")
    return check_repo_id(repo_id), revision or None


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def describe_hub_error(err: BaseException) -> str:
    """A short reason for a Hub failure: `401 Unauthorized — check HF_TOKEN ...`, `cannot connect to ...`."""
    status = _http_status(err)
    if status is not None:
        reason = getattr(err.response, "reason_phrase", "") or ""
        hint = _HINTS.get(status, "the Hub refused the request")
        return f"{status} {reason}".strip() + f" — {hint}"
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be contacted — unset it to push or to fetch new files"
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {first_line} — check the network connection and HF_ENDPOINT"


def hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a Hub call raises for network, HTTP and file problems (not programming errors)."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import EntryNotFoundError

    return httpx2.HTTPError, OSError, ValueError, EntryNotFoundError


def download_ref(ref: str) -> Path:
    """Download (or find in the cache) an exported folder on the Hub; returns the local snapshot folder.

    config.json says which weights file(s) the export has; all files come from the same commit. With
    HF_HUB_OFFLINE=1 the files come from the local cache only.
    """
    from huggingface_hub import hf_hub_download

    repo_id, revision = parse_hf_ref(ref)
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision))
        folder = config_path.parent
        commit = folder.name  # the snapshot folder is named after the commit: pin the rest of the files to it
        for name in weight_files(read_config(folder)):
            hf_hub_download(repo_id, name, revision=commit)
        _try_card(repo_id, commit)
    except hub_errors() as err:
        raise SpkpruneError(f"cannot fetch {ref}: {describe_download_error(err)}") from None
    return folder


def _try_card(repo_id: str, commit: str) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id, CARD_FILE, revision=commit)
    except EntryNotFoundError:
        pass  # a folder pushed by other tools may lack a card; the weights are what matters


def describe_download_error(err: BaseException) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    if isinstance(err, RevisionNotFoundError):
        return "the revision does not exist on the Hub — check the branch, tag or commit after @"
    if isinstance(err, LocalEntryNotFoundError):
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return "not in the local cache and HF_HUB_OFFLINE is set — unset it to download it once"
        return "not in the local cache and the Hub cannot be reached — check the network connection and HF_ENDPOINT"
    return describe_hub_error(err)
