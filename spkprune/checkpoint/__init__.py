"""Checkpoints: a state_dict, its pruning masks and JSON metadata, saved to and loaded from any reference.

The package is the "checkpoint references and formats" layer, above models and the store and below everything
that trains, prunes, counts or exports. Its modules, bottom to top:

- core.py      the Checkpoint dataclass and the mask check
- blob.py      the store's blob format (`.safetensors` with masks and metadata); plain safetensors files
- formats.py   what exported folders' files share: names, versions, mask packing, the one mask checksum
- sparse.py    the compact sparse weights file;  folder.py  dense files, config.json, whole exported folders
- hub.py       `hf://ORG/REPO[@REVISION]`: parsing and downloading
- sources.py   load_checkpoint: the one resolver of a reference (store, file, folder, Hub)
- build.py     models from checkpoints;  summary.py  sparsity and tensor tables
- saving.py    save_checkpoint;  original.py  importing original `.pth` checkpoints
"""

from spkprune.checkpoint.blob import (
    FORMAT,
    FORMAT_VERSION,
    MASK_PREFIX,
    PICKLE_SUFFIXES,
    from_tensors,
    read_safetensors_file,
    to_tensors,
)
from spkprune.checkpoint.build import (
    SELECTOR_PREFIX,
    build_model,
    in_model_order,
    model_from_ref,
    prunable_keys,
    state_dict_keys,
)
from spkprune.checkpoint.core import Checkpoint, mask_mismatch
from spkprune.checkpoint.formats import mask_sha256
from spkprune.checkpoint.original import import_checkpoint, prepare_import, read_original_checkpoint
from spkprune.checkpoint.saving import save_checkpoint
from spkprune.checkpoint.sources import load_artifact, load_checkpoint, load_path
from spkprune.checkpoint.summary import BUFFER_SUFFIXES, is_buffer_key, natural_key, sparsity_report, tensor_summary

__all__ = [
    "BUFFER_SUFFIXES", "FORMAT", "FORMAT_VERSION", "MASK_PREFIX", "PICKLE_SUFFIXES", "SELECTOR_PREFIX",
    "Checkpoint", "build_model", "from_tensors", "import_checkpoint", "in_model_order", "is_buffer_key",
    "load_artifact", "load_checkpoint", "load_path", "mask_mismatch", "mask_sha256", "model_from_ref",
    "natural_key", "prepare_import", "prunable_keys", "read_original_checkpoint", "read_safetensors_file",
    "save_checkpoint", "sparsity_report", "state_dict_keys", "tensor_summary", "to_tensors",
]
