"""An unpickler for data set files that only builds plain data: dicts, lists, strings, bytes, numbers, numpy arrays.

`pickle.load` calls whatever callable a file names, so a crafted file runs code the moment it is read. This
unpickler resolves only numpy's array reconstruction; any other global is refused before it is looked up, so
nothing a file names is ever imported or called.
"""

from __future__ import annotations

import codecs
import pickle
from typing import BinaryIO

import numpy as np

try:  # numpy >= 2 keeps it in numpy._core; files written by numpy 1 name numpy.core (both are accepted below)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol 0-2 pickles written by Python 3 use it for bytes, and nothing more."""
    if encoding not in ("latin1", "latin-1"):  # compared, never looked up: a codec lookup can import modules
        raise pickle.UnpicklingError(f"it encodes bytes with codec {encoding!r}, expected latin1")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a callable or class outside the allowed set."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise RefusedGlobal(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses a persistent id, which plain data never holds")


def load_plain_data(file: BinaryIO, encoding: str = "ASCII"):
    """Unpickle `file` allowing only plain data and numpy arrays; RefusedGlobal names anything else it holds.

    Other errors (truncated or random bytes) propagate as whatever the unpickler raises.
    """
    return _PlainDataUnpickler(file, encoding=encoding).load()
