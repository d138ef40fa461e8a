"""One switch for progress bars, as `huggingface_hub.utils.disable_progress_bars` is for the Hub's.

hf_moeprune's calibration bar shows unless `disable_progress_bars()` was called or the environment sets
`HF_MOEPRUNE_DISABLE_PROGRESS_BARS=1`. `hf-moeprune ... --no-progress` calls it, which also silences the bars of
huggingface_hub (uploads, downloads), datasets (reading calibration files) and transformers (loading weights).
"""

from __future__ import annotations

import os

_disabled = os.environ.get("HF_MOEPRUNE_DISABLE_PROGRESS_BARS", "").strip().lower() in ("1", "true", "yes", "on")


def progress_bars_disabled() -> bool:
    """True when progress bars were turned off (by `disable_progress_bars` or the environment)."""
    return _disabled


def disable_progress_bars() -> None:
    """Turn off hf_moeprune's progress bars and those of the Hugging Face libraries it drives."""
    _set_progress_bars(False)


def enable_progress_bars() -> None:
    """Show the progress bars again, ours and those of the Hugging Face libraries."""
    _set_progress_bars(True)


def _set_progress_bars(enabled: bool) -> None:
    global _disabled
    _disabled = not enabled
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    if enabled:
        huggingface_hub.utils.enable_progress_bars()
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
    else:
        huggingface_hub.utils.disable_progress_bars()
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
