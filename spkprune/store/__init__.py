"""The checkpoint/mask store: an SQLite index and content-addressed safetensors blobs (see docs/store.md)."""

from spkprune.store.refs import DEFAULT_TAG, check_name, check_tag, format_ref, is_store_ref, parse_ref
from spkprune.store.index import CorruptRowError
from spkprune.store.store import Artifact, Store

__all__ = [
    "Artifact",
    "CorruptRowError",
    "DEFAULT_TAG",
    "Store",
    "check_name",
    "check_tag",
    "format_ref",
    "is_store_ref",
    "parse_ref",
]
