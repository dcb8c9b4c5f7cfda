"""spkprune: prune pretrained spiking transformers (Spikformer family)."""

from spkprune.checkpoint import read_original_checkpoint
from spkprune.errors import SpkpruneError
from spkprune.models import create_model, get_config, list_models
from spkprune.version import __version__


def load_original(path) -> dict:
    """The state_dict inside an original Spikformer checkpoint (`.pth` / `.pth.tar` as the original scripts save
    them, or `.safetensors`), read safely with `torch.load(weights_only=True)`; ready for `load_state_dict`."""
    return read_original_checkpoint(path)[0]


__all__ = ["SpkpruneError", "__version__", "create_model", "get_config", "list_models", "load_original"]
