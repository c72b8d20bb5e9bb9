"""``anomalyclip-app``: serve the page on this computer, with the model arguments of ``anomalib predict``.

Examples::

    anomalyclip-app --model.prompt_weights anomalyclip-mvtec
    anomalyclip-app --ckpt_path results/AnomalyCLIP/MVTecAD/bottle/latest/weights/lightning/model.ckpt
    anomalyclip-app --model ExportedAnomalyCLIP --model.path weights/openvino/model.xml

The app's own options are ``--host``, ``--port`` and ``--workdir``; every other argument is passed to anomalib's
command line as it is (``--model.*``, ``--ckpt_path``, ``--trainer.accelerator``...). The page is served at once, and
the model is built once while it loads (anomalib's command line takes most of the start-up): wrong arguments stop
the app with the package's message before any run.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    """Serve the page, check the model arguments by building the model, then serve until interrupted."""
    for name, value in OFFLINE_GRADIO.items():
        os.environ.setdefault(name, value)
    options, model_words = parse_arguments(argv)
    from anomalib_anomalyclip.app.page import build_page, launch
    from anomalib_anomalyclip.app.service import BatchScorer, ModelArguments
    from anomalib_anomalyclip.errors import AnomalyCLIPError

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="anomalyclip-app-"))
    scorer = BatchScorer(ModelArguments(tuple(model_words)), workdir)
    page = build_page(scorer)
    launch(page, options.host, options.port, workdir)
    try:
        scorer.check()
    except AnomalyCLIPError as error:  # the arguments cannot make a run: the package's message, no traceback
        page.close()
        sys.stderr.write(f"ERROR: {error}\n")
        raise SystemExit(1) from None
    print("The model is ready.", flush=True)
    page.block_thread()


if __name__ == "__main__":
    main()
