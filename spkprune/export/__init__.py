"""Export: a checkpoint as a Hub-ready folder (weights, config.json, model card), and pushing it to the Hub.

The file formats themselves and pulling `hf://` references belong to spkprune.checkpoint, the layer below.
"""

from spkprune.export.exporter import ExportResult, export_checkpoint
from spkprune.export.hub import PushResult, push_folder

__all__ = ["ExportResult", "PushResult", "export_checkpoint", "push_folder"]
