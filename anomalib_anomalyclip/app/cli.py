"""``anomalyclip-app``: serve the page on this computer, with the model arguments of ``anomalib predict``.

Examples::

    anomalyclip-app --model.prompt_weights anomalyclip-mvtec
    anomalyclip-app --ckpt_path results/AnomalyCLIP/MVTecAD/bottle/latest/weights/lightning/model.ckpt
    anomalyclip-app --model ExportedAnomalyCLIP --model.path weights/openvino/model.xml

The app's own options are ``--host``, ``--port`` and ``--workdir``; every other argument is passed to anomalib's
command line as it is (``--model.*``, ``--ckpt_path``, ``--trainer.accelerator``...). The model is built once at
start-up, so wrong arguments stop the app with the package's message before the page is served.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

OFFLINE_GRADIO = {"GRADIO_ANALYTICS_ENABLED": "False"}


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The app's own options, and the model arguments (everything else, in order)."""
    parser = argparse.ArgumentParser(
        prog="anomalyclip-app",
        description="A local page to inspect a batch of images with AnomalyCLIP (zero-shot, few-shot, mutual).",
        epilog="Other arguments are the model's, as for `anomalib predict`: --model.prompt_weights anomalyclip-mvtec, "
        "--ckpt_path model.ckpt, or --model ExportedAnomalyCLIP --model.path model.xml.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs keep their files (default: a temp dir)")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Check the model arguments by building the model, then serve the page until interrupted."""
    for name, value in OFFLINE_GRADIO.items():
        os.environ.setdefault(name, value)
    options, model_words = parse_arguments(argv)
    from .page import build_page, launch
    from .service import BatchScorer, ModelArguments

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="anomalyclip-app-"))
    scorer = BatchScorer(ModelArguments(tuple(model_words)), workdir)
    scorer.check()
    launch(build_page(scorer), options.host, options.port, workdir)


if __name__ == "__main__":
    main()
