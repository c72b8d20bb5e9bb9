"""The method: AnomalyCLIP and the scoring rooms beside it, in torch only.

CLIP loading (``backbone``), the dual-path visual encoder (``dpam``), the prompts and their text encoder
(``prompts``), scores and maps (``scoring``), the glocal loss (``loss``), the few-shot bank (``few_shot``), mutual
scoring (``mutual``), tiling (``tiling``, ``tiled_model``), the reference's resize (``resize``), the torch model that
composes them (``torch_model``) and the exported path (``inference_model``). Nothing here imports Lightning or
anomalib's Lightning parts (``tests/test_layers.py`` checks); anomalib's ``InferenceBatch`` is the shared result type.
"""
