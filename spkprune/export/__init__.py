"""Export: dense and sparse safetensors folders, the model card, and Hugging Face Hub push / pull."""

from spkprune.export.exporter import ExportResult, export_checkpoint
from spkprune.export.formats import read_folder, read_sparse, write_sparse
from spkprune.export.hub import download_ref, push_folder

__all__ = ["ExportResult", "download_ref", "export_checkpoint", "push_folder", "read_folder", "read_sparse",
           "write_sparse"]
