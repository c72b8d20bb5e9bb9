"""Mutual scoring at run scale: ``anomalib predict`` over folders of N images, peak memory and time per image.

Runs :func:`anomalyclip_bench.run_scale.main`: one child process per folder size, the tiny random CLIP, generated
images. The memory figure that matters is ``MiB/added image`` (the growth of the peak per image above the first
folder size), to compare with what the in-memory path held per image (printed above the table).

Usage::

    python benchmarks/mutual_scale.py                                   # 30 and 280 images at 518 px, pool 10
    python benchmarks/mutual_scale.py --images 50 200 1000 --pool-size 200
    python benchmarks/mutual_scale.py --images 50 1000 --pool-size 0    # zero-shot, no mutual scoring
    python benchmarks/mutual_scale.py --images 50 1000 --runners eager openvino --chart run_scale.png
    python benchmarks/mutual_scale.py --runners --extrapolate-pool 32 --images 50 1000 10000  # ViT-L/14@336 only
"""

from __future__ import annotations

from anomalyclip_bench.run_scale import main

if __name__ == "__main__":
    main()
