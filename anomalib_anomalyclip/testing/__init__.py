"""Helpers for tests, examples and benchmarks: a tiny random CLIP in the real checkpoint layouts, toy datasets.

The model never imports this package: it is for code that needs CLIP files and images without downloading
anything (``anomalib_anomalyclip.data.make_mvtec_like_dataset`` still names the toy-data writer). Names are
imported on first use, so that the toy-data writer does not import torch.

* :mod:`.tiny_clip`: ``python -m anomalib_anomalyclip.testing.tiny_clip PATH`` writes a tiny CLIP checkpoint.
* :mod:`.toy_data`: ``python -m anomalib_anomalyclip.testing.toy_data ROOT`` writes MVTec-format toy categories.
"""

from typing import TYPE_CHECKING

from anomalib_anomalyclip._lazy import lazy_attributes

if TYPE_CHECKING:
    from anomalib_anomalyclip.testing.tiny_clip import (
        TinyClipConfig,
        build_tiny_clip,
        save_open_clip_checkpoint,
        save_openai_jit_archive,
        save_openai_state_dict,
        tiny_clip_digest,
    )
    from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

__all__ = [
    "TinyClipConfig",
    "build_tiny_clip",
    "make_mvtec_like_dataset",
    "save_open_clip_checkpoint",
    "save_openai_jit_archive",
    "save_openai_state_dict",
    "tiny_clip_digest",
]

_TINY_CLIP = "anomalib_anomalyclip.testing.tiny_clip"
__getattr__, __dir__ = lazy_attributes(
    globals(),
    {name: _TINY_CLIP for name in __all__ if name != "make_mvtec_like_dataset"}
    | {"make_mvtec_like_dataset": "anomalib_anomalyclip.testing.toy_data"},
)
