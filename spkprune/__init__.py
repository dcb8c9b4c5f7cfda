"""spkprune: prune pretrained spiking transformers (Spikformer family)."""

from spkprune.errors import SpkpruneError
from spkprune.models import create_model, get_config, list_models

__version__ = "0.1.0"


def load_original(path) -> dict:
    """The state_dict inside an original Spikformer checkpoint (`.pth` / `.pth.tar` as the original scripts save
    them, or `.safetensors`), read safely with `torch.load(weights_only=True)`; ready for `load_state_dict`."""
    from spkprune.checkpoint import read_original_checkpoint

    return read_original_checkpoint(path)[0]


__all__ = ["SpkpruneError", "__version__", "create_model", "get_config", "list_models", "load_original"]
