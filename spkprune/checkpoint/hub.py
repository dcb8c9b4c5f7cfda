"""Hugging Face Hub references, `hf://ORG/REPO[@REVISION]`: parse them and download an exported folder.

The token is whatever huggingface_hub finds (HF_TOKEN, the token file of `hf auth login`); spkprune never reads,
prints or stores it. Every failure becomes one SpkpruneError line. Pushing lives above, with the export.
huggingface_hub is imported inside the functions that use it: it is slow to import and most commands never need it.

Offline, the Hub client retries with backoff for half a minute, logging each attempt. So before any Hub call,
spkprune opens one TCP connection to the endpoint (or its proxy) with a short timeout: when that fails, a pull is
served from the Hub cache only and a push stops at once, each with one line. HF_HUB_OFFLINE=1 skips the network.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from spkprune.checkpoint.folder import read_config, weight_files
from spkprune.checkpoint.formats import CARD_FILE, CONFIG_FILE
from spkprune.errors import SpkpruneError

HF_PREFIX = "hf://"
# A lost SYN is resent after 1 s: 1.5 s survives one loss and still answers "offline" at once.
PROBE_TIMEOUT_S = 1.5
LOCAL_COPY_HINT = (
    "to work without the Hub, pass a local copy instead (a folder written by `spkprune export REF --out DIR` "
    "loads as DIR), or set HF_HUB_OFFLINE=1 to load revisions already in the Hub cache without trying the network"
)
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


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub endpoint accepts a TCP connection within `timeout` seconds, else why not, in one line:
    `cannot reach the Hugging Face Hub at URL (connection refused)`. Sends nothing, so never the token."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    where = f"cannot reach the Hugging Face Hub at {_without_credentials(endpoint)}"
    try:
        host, port = _connect_target(endpoint)
    except ValueError as err:  # a port that is not a number, say
        return f"{where} (HF_ENDPOINT is not a valid URL: {err})"
    if not host:
        return f"{where} (HF_ENDPOINT names no host: write it like https://huggingface.co)"
    outcome: dict[str, str | None] = {}

    def connect() -> None:
        outcome["cause"] = _connect_error(host, port, timeout)

    # A thread, because name resolution has no timeout of its own; a daemon one, so that it never delays the exit.
    probe = threading.Thread(target=connect, name="spkprune-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    cause = outcome.get("cause", f"no answer from {host} within {timeout:g} s")
    return None if cause is None else f"{where} ({cause})"


def _connect_target(endpoint: str) -> tuple[str, int]:
    """(host, port) that the Hub client connects to for `endpoint`: the proxy's when one applies."""
    url = urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _connect_error(host: str, port: int, timeout: float) -> str | None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror:
        return f"cannot resolve {host}"
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no answer from {host} within {timeout:g} s"
    except OSError as err:
        return (err.strerror or type(err).__name__).lower()
    return None


def _without_credentials(endpoint: str) -> str:
    url = urlsplit(endpoint)
    return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()  # user:password@ never reaches the output


@contextmanager
def quiet_hub_logs():
    """The Hub client logs every retry as a warning; spkprune reports one line per failure instead.
    HF_HUB_VERBOSITY, when set, wins."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    if not os.environ.get("HF_HUB_VERBOSITY"):
        hub_logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        hub_logger.setLevel(level)


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
    HF_HUB_OFFLINE=1, or when the Hub cannot be reached, the files come from the local cache only.
    """
    from huggingface_hub import constants

    repo_id, revision = parse_hf_ref(ref)
    offline = constants.is_offline_mode()
    unreachable = None if offline else hub_unreachable()
    try:
        with quiet_hub_logs():
            return _download(repo_id, revision, cache_only=offline or unreachable is not None)
    except hub_errors() as err:
        raise SpkpruneError(f"cannot fetch {ref}: {describe_download_error(err, unreachable)}") from None


def _download(repo_id: str, revision: str | None, cache_only: bool) -> Path:
    fetch = _cached_file if cache_only else _hub_file
    folder = fetch(repo_id, CONFIG_FILE, revision).parent
    commit = folder.name  # the snapshot folder is named after the commit: pin the rest of the files to it
    for name in weight_files(read_config(folder)):
        fetch(repo_id, name, commit)
    if not cache_only:
        _try_card(repo_id, commit)
    return folder


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision))


def _cached_file(repo_id: str, filename: str, revision: str | None) -> Path:
    """A file from the Hub cache alone. Not `hf_hub_download(local_files_only=True)`: that still asks the endpoint
    for huggingface_hub's agent registry, and waits up to 3 s for it when the network drops packets."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(path, str):
        raise LocalEntryNotFoundError(f"{filename} of {repo_id}@{revision or 'main'} is not in the Hub cache")
    return Path(path)


def _try_card(repo_id: str, commit: str) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id, CARD_FILE, revision=commit)
    except EntryNotFoundError:
        pass  # a folder pushed by other tools may lack a card; the weights are what matters


def describe_download_error(err: BaseException, unreachable: str | None = None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    if isinstance(err, RevisionNotFoundError):
        return "the revision does not exist on the Hub — check the branch, tag or commit after @"
    if not isinstance(err, LocalEntryNotFoundError):
        return describe_hub_error(err)
    cache = f"not in the local cache ({constants.HF_HUB_CACHE})"
    if unreachable:
        return f"{unreachable}, and this revision is {cache}; {LOCAL_COPY_HINT}"
    if constants.is_offline_mode():
        return (f"{cache} and HF_HUB_OFFLINE is set — unset it to download it once, or pass a local copy (a folder "
                "written by `spkprune export REF --out DIR` loads as DIR)")
    return f"{cache} and the Hub cannot be reached — check the network connection and HF_ENDPOINT"
