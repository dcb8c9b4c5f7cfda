"""spkprune: prune pretrained spiking transformers (Spikformer family)."""

from spkprune.errors import SpkpruneError
from spkprune.models import create_model, get_config, list_models

__version__ = "0.1.0"

__all__ = ["SpkpruneError", "__version__", "create_model", "get_config", "list_models"]
