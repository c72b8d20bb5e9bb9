"""``anomalyclip-app``: a local page to inspect a batch of images (needs the ``[app]`` extra: Gradio).

* :mod:`.service`: a batch scored by the package's own ``anomalib predict`` run, built in-process;
* :mod:`.downloads`: ``predictions.csv`` at the page's threshold and the zip of overlays;
* :mod:`.histogram`: the scores' histogram with the threshold;
* :mod:`.page`: the Gradio page;
* :mod:`.cli`: the ``anomalyclip-app`` command.
"""
