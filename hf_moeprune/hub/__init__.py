"""Publishing reduced checkpoints: generated model cards and `push_to_hub`.

- [`build_model_card`] / [`write_model_card`]: the card of a checkpoint, from the `moeprune` entry of its config.
- [`read_recipes_from_card`]: the recipes embedded in a card, back as `MoEPruneConfig` objects.
- [`push_checkpoint`]: upload a checkpoint folder with its card through huggingface_hub's `upload_folder`.
"""

from .card import (
    GENERATED_MARKER,
    build_model_card,
    method_card_info,
    read_recipes_from_card,
    write_model_card,
)
from .push import HubPushError, push_checkpoint

__all__ = [
    "GENERATED_MARKER",
    "HubPushError",
    "build_model_card",
    "method_card_info",
    "push_checkpoint",
    "read_recipes_from_card",
    "write_model_card",
]
