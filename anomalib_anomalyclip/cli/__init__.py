"""AnomalyCLIP runs of anomalib's command line.

The patches of anomalib's, Lightning's and jsonargparse's code (``patches``, each with why and its upstream fix), the
arguments rewritten before parsing (``arguments``), the check before any work (``preflight``), errors printed once
and the stored CLIP (``support``), quiet logs and the offline switch (``logs``, ``network``).
"""
