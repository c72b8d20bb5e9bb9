"""Cache of the frozen visual features for prompt training.

Prompt training learns about 43 K prompt numbers while the visual encoder is frozen and
sees the same training images every epoch. The cache keeps, per training image, exactly
what :class:`~anomalib_anomalyclip.method.dpam.DualPathVisualEncoder` returns, so that only the
first epoch runs the visual encoder and later epochs run the text side and the loss alone.
The cache assumes that an image path always yields the same pixels; random augmentations
switch it off, with a log message.

Modules:

* :mod:`.layout`: one image's features as one row (:class:`FeatureLayout`), storage precision;
* :mod:`.key`: what the features depend on (:func:`cache_key`, :func:`weights_digest`);
* :mod:`.transforms`: which training inputs may be cached (deterministic transforms only);
* :mod:`.sync`: the processes sharing one cache under DDP (:class:`RankSync`);
* :mod:`.index`: the files of a memory-mapped cache, their index and its checks;
* :mod:`.store`: the cache itself (:class:`FeatureCache`, :func:`open_feature_cache`);
* :mod:`.lightning`: :class:`FeatureCacheCallback` and the decisions of a Lightning run
  (whether to cache, where, validation reads).
"""

from anomalib_anomalyclip.integration.feature_cache.index import DATA_NAME, INDEX_NAME
from anomalib_anomalyclip.integration.feature_cache.key import cache_key, input_key, weights_digest
from anomalib_anomalyclip.integration.feature_cache.layout import STORAGE_DTYPES, FeatureLayout, check_storage_dtype
from anomalib_anomalyclip.integration.feature_cache.lightning import (
    FeatureCacheCallback,
    PromptTrainingModule,
    cache_location,
    training_feature_cache,
    validation_feature_cache,
)
from anomalib_anomalyclip.integration.feature_cache.store import CacheStats, FeatureCache, open_feature_cache
from anomalib_anomalyclip.integration.feature_cache.sync import RankSync
from anomalib_anomalyclip.integration.feature_cache.transforms import (
    DETERMINISTIC_TRANSFORMS,
    cacheable_inputs,
    nondeterministic_transforms,
)

__all__ = [
    "DATA_NAME",
    "DETERMINISTIC_TRANSFORMS",
    "INDEX_NAME",
    "STORAGE_DTYPES",
    "CacheStats",
    "FeatureCache",
    "FeatureCacheCallback",
    "FeatureLayout",
    "PromptTrainingModule",
    "RankSync",
    "cache_key",
    "cache_location",
    "cacheable_inputs",
    "check_storage_dtype",
    "input_key",
    "nondeterministic_transforms",
    "open_feature_cache",
    "training_feature_cache",
    "validation_feature_cache",
    "weights_digest",
]
