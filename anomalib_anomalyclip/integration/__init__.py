"""The method inside anomalib: the Lightning module, its callbacks, checkpoints, export and pre/post-processing.

``lightning_model.AnomalyCLIP`` builds the torch model of :mod:`anomalib_anomalyclip.method` from the configuration
groups (:mod:`anomalib_anomalyclip.config`); mutual scoring of a run's pools (``pool_scoring``, ``pool_state``), the
prompt plan, metrics and the feature cache of prompt training live beside it.
"""
