"""The page: a batch of images in, a gallery sorted by score, a threshold chosen by looking, downloads out.

Built with Gradio's ``Blocks``. The Run button starts the batch in a worker thread (:class:`.service.BatchScorer`)
and streams its progress to the page; the threshold slider re-labels the gallery (a table of names, scores,
decisions and overlays), the histogram and the CSV without running the model again. Nothing is loaded from the
internet: the theme uses the system's fonts, the histogram is an inline SVG, and Gradio's analytics are off
(:mod:`.cli`).
"""

from __future__ import annotations

import functools
import html
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from anomalib_anomalyclip.app.downloads import MODEL_THRESHOLD, decision, write_overlay_zip, write_predictions_csv
from anomalib_anomalyclip.app.histogram import histogram_svg
from anomalib_anomalyclip.app.service import BatchProgress, BatchRequest, BatchResult, BatchScorer, ScoredImage
from anomalib_anomalyclip.errors import AnomalyCLIPError

__all__ = ["build_page", "launch"]

POLL_SECONDS = 0.25
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "monospace")
CSS = """
#gallery table { border-collapse: collapse; width: 100%; }
#gallery td, #gallery th { padding: 2px 8px; text-align: left; vertical-align: middle; }
#gallery img { height: 120px; }
#gallery tr.anomalous td.decision { color: #d62728; font-weight: 600; }
"""


def build_page(scorer: BatchScorer) -> Any:
    """The page's ``gradio.Blocks``, scoring with ``scorer``."""
    import gradio as gr

    with gr.Blocks(title="AnomalyCLIP: inspect a batch", analytics_enabled=False) as page:
        gr.Markdown(f"## AnomalyCLIP: inspect a batch of images\nModel: `{' '.join(scorer.arguments.words)}`")
        result = gr.State(None)
        with gr.Row():
            with gr.Column():
                images = gr.File(
                    label="Images to inspect", file_count="multiple", file_types=["image"], elem_id="images"
                )
                folder = gr.Textbox(label="...or a folder of images on this computer", elem_id="folder")
            with gr.Column():
                references = gr.File(
                    label="Normal references (optional: few-shot)", file_count="multiple", file_types=["image"],
                    elem_id="references",
                )  # fmt: skip
                k_shot = gr.Markdown("Zero-shot: no references (k = 0).", elem_id="k-shot")
        with gr.Row():
            mutual = gr.Checkbox(label="Mutual scoring across the batch", elem_id="mutual")
            tiling = gr.Checkbox(label="Tiling (small defects on large images)", elem_id="tiling")
            run = gr.Button("Run", variant="primary", elem_id="run")
        status = gr.Markdown("Drop images and press Run.", elem_id="status")
        problems = gr.Markdown("", elem_id="problems")
        threshold = gr.Slider(0.0, 1.0, value=MODEL_THRESHOLD, step=0.001, label="Threshold", elem_id="threshold")
        histogram = gr.HTML(histogram_svg([], MODEL_THRESHOLD), elem_id="histogram")
        gallery = gr.HTML("", elem_id="gallery")
        with gr.Row():
            csv_file = gr.File(label="predictions.csv", elem_id="csv")
            zip_file = gr.File(label="overlays.zip", elem_id="zip")

        references.change(_describe_references, references, k_shot)
        shown = [gallery, histogram, csv_file]
        # The run clears the results, then shows them at the slider's value when it ends (it may have moved).
        run.click(_cleared, None, [result, gallery, csv_file]).then(
            functools.partial(_run, scorer),
            [images, folder, references, mutual, tiling],
            [result, status, problems, zip_file],
        ).then(_shown, [result, threshold], shown)
        threshold.change(_shown, [result, threshold], shown, show_progress="hidden")
    return page


def launch(page: Any, host: str, port: int, workdir: Path) -> None:
    """Start serving ``page`` on ``host:port`` in the background, offline (system fonts, no web fonts)."""
    import gradio as gr

    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))
    page.queue().launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(workdir)],
        theme=theme,
        css=CSS,
        footer_links=[],
        prevent_thread_lock=True,
    )


def _describe_references(files: Sequence[str] | None) -> str:
    count = len(files or [])
    return f"Few-shot: k = {count} reference(s)." if count else "Zero-shot: no references (k = 0)."


def _run(
    scorer: BatchScorer,
    images: Sequence[str] | None,
    folder: str,
    references: Sequence[str] | None,
    mutual: bool,
    tiling: bool,
) -> Iterator[tuple[Any, str, str, str | None]]:
    """Score the batch in a worker thread, yielding its progress, then the result, its summary, problems and zip."""
    from anomalib_anomalyclip.data.images import list_image_files

    try:
        files = [Path(path) for path in images or []] + (list_image_files(folder.strip()) if folder.strip() else [])
    except (AnomalyCLIPError, FileNotFoundError) as error:
        yield None, "Nothing was scored.", f"**{error}**", None
        return
    if not files:
        yield None, "Drop images (or give a folder) first.", "", None
        return
    request = BatchRequest(files, [Path(path) for path in references or []], mutual, tiling)
    progress = BatchProgress(stage="Starting")
    outcome: dict[str, BatchResult] = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("result", scorer.score(request, progress)), daemon=True)
    worker.start()
    while worker.is_alive():
        yield None, f"Running: {progress.describe()}", "", None
        time.sleep(POLL_SECONDS)
    result = outcome.get("result") or BatchResult(error="The run stopped unexpectedly (see the terminal).")
    yield result, _summary(result), _problems(result), _overlay_zip(result)


def _cleared() -> tuple[None, str, None]:
    """No result, an empty gallery and no CSV (while a run goes on)."""
    return None, "", None


def _shown(result: BatchResult | None, threshold: float) -> tuple[str, str, str | None]:
    """The gallery, the histogram and the CSV file at ``threshold`` (the model is not run again)."""
    images = sorted(result.images, key=lambda image: -image.score) if result else []
    csv_path = str(write_predictions_csv(images, threshold, result.folder / "page")) if images else None
    return _gallery(images, threshold), histogram_svg([image.score for image in images], threshold), csv_path


def _overlay_zip(result: BatchResult) -> str | None:
    return str(write_overlay_zip(result.images, result.folder / "page")) if result.images else None


def _gallery(images: Sequence[ScoredImage], threshold: float) -> str:
    """One row per image, highest score first: rank, name, score, decision, and the run's overlay picture."""
    if not images:
        return ""
    rows = []
    for rank, image in enumerate(images, start=1):
        label = decision(image.score, threshold)
        picture = f'<img src="{_file_url(image.overlay)}" alt="overlay of {html.escape(image.name)}">'
        rows.append(
            f'<tr class="{label}" data-name="{html.escape(image.name)}" data-score="{image.score:.6f}">'
            f'<td>{rank}</td><td class="name">{html.escape(image.name)}</td><td class="score">{image.score:.6f}</td>'
            f'<td class="decision">{label}</td><td>{picture if image.overlay else ""}</td></tr>'
        )
    anomalous = sum(decision(image.score, threshold) == "anomalous" for image in images)
    head = "<tr><th>#</th><th>image</th><th>score</th><th>decision</th><th>image, anomaly map, mask</th></tr>"
    caption = f"<caption>{anomalous} of {len(images)} anomalous at threshold {threshold:.3f}</caption>"
    return f"<table>{caption}{head}{''.join(rows)}</table>"


def _file_url(path: Path | None) -> str:
    """The address at which Gradio serves a file of the work folder (relative to the page)."""
    return f"gradio_api/file={quote(str(path))}"


def _summary(result: BatchResult) -> str:
    if result.error:
        return "Nothing was scored."
    mode = f"few-shot (k = {result.k_shot})" if result.k_shot else "zero-shot"
    return f"Done: {len(result.images)} image(s) scored, {mode}. Results in `{result.folder}`."


def _problems(result: BatchResult) -> str:
    lines = [f"**{result.error}**"] if result.error else []
    if result.bad_files:
        lines.append(f"{len(result.bad_files)} file(s) not scored:")
        lines += [f"- `{name}`: {html.escape(message)}" for name, message in result.bad_files]
    return "\n".join(lines)
