"""``anomalyclip-app`` in a real browser: headless Debian Chromium driven by Playwright, the tiny CLIP, no network.

The page is served by the app's command (a separate process, as a user starts it); the CSV it offers is compared
with ``anomalib predict`` on the same images through the real command line. The screenshot of the README and
docs/app.md is written to ``docs/images/app.png``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from test_cli_end_to_end import _free_local_port, anomalib_cli

from anomalib_anomalyclip.testing import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "app.png"
IMAGE_SIZE = "56"
START_UP_LIMIT_S = 30.0
RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 generated images (2 anomalous) in ``images/``, 3 normal references, a corrupt PNG, the prompts file."""
    from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts

    root = tmp_path_factory.mktemp("app_batch")
    dataset = make_mvtec_like_dataset(
        root / "toy", categories=["alpha"], n_train_good=3, n_test_good=6, n_test_defect=2, seed=3
    )
    images, references = root / "images", root / "references"
    images.mkdir()
    references.mkdir()
    for kind in ("good", "blob"):
        for path in sorted((dataset / "alpha" / "test" / kind).glob("*.png")):
            shutil.copy(path, images / f"{kind}_{path.name}")
    for path in sorted((dataset / "alpha" / "train" / "good").glob("*.png")):
        shutil.copy(path, references / f"reference_{path.name}")
    broken = root / "broken.png"
    broken.write_bytes((images / "good_000.png").read_bytes()[:200])
    import torch

    torch.manual_seed(0)
    save_prompts(PromptLearner(PromptConfig(width=64)), root / "prompts.pt")
    return {"root": root, "images": images, "references": references, "broken": broken, "prompts": root / "prompts.pt"}


def _model_words(tiny_clip_path: Path, prompts: Path) -> list[str]:
    return [
        "--model.pretrained", str(tiny_clip_path), "--model.prompt_weights", str(prompts),
        "--model.image_size", IMAGE_SIZE,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium: Debian's package (`.ci/run` installs it), never a Playwright download."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("No `chromium` on PATH: install Debian's package (apt-get install chromium), as .ci/run does.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(batch: dict[str, Path], tiny_clip_path: Path, browser: object) -> Iterator[dict[str, object]]:
    """The app started as a user starts it, and the seconds until its page was usable in the browser."""
    port = _free_local_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GRADIO_TEMP_DIR": str(batch["root"] / "gradio")}
    script = Path(sys.executable).with_name("anomalyclip-app")  # installed by `pip install -e .[dev]`
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "anomalib_anomalyclip.app.cli"]
    command += ["--port", str(port)]
    command += ["--workdir", str(batch["root"] / "work"), *_model_words(tiny_clip_path, batch["prompts"])]
    log = (batch["root"] / "app.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=batch["root"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        page = browser.new_page()
        while True:
            if process.poll() is not None:
                pytest.fail(f"anomalyclip-app exited: {(batch['root'] / 'app.log').read_text()[-3000:]}")
            try:
                page.goto(url, timeout=2_000)
                page.locator("#run").wait_for(timeout=10_000)
                break
            except Exception:  # not listening yet
                time.sleep(0.5)
        start_up = time.perf_counter() - started
        page.close()
        yield {"url": url, "start_up_s": start_up}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def page(browser: object, app: dict[str, object]) -> Iterator[object]:
    """A fresh page of the app; every request it makes is recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.goto(str(app["url"]))
    page.locator("#run").wait_for()
    yield page
    page.close()


def _upload(page: object, element: str, files: list[Path]) -> None:
    page.locator(f"#{element} input[type=file]").set_input_files([str(path) for path in files])
    for path in files:
        page.locator(f"#{element}").get_by_text(path.stem, exact=True).first.wait_for(timeout=30_000)


def _run(page: object, expected_rows: int | None, while_running: Callable[[], None] = lambda: None) -> None:
    page.locator("#run").click()
    page.get_by_text("Running:").first.wait_for(timeout=30_000)  # progress while the batch is scored
    while_running()
    status = page.locator("#status")
    status.get_by_text("Done:").or_(status.get_by_text("Nothing was scored")).wait_for(timeout=RUN_TIMEOUT_MS)
    if expected_rows is not None:
        page.locator("#gallery tr[data-score]").nth(expected_rows - 1).wait_for()


def _rows(page: object) -> list[tuple[str, float, str]]:
    rows = page.locator("#gallery tr[data-score]")
    return [
        (row.get_attribute("data-name"), float(row.get_attribute("data-score")), row.locator(".decision").inner_text())
        for row in rows.all()
    ]


def _set_threshold(page: object, value: float, caption: bool = True) -> None:
    box = page.locator("#threshold input[type=number]")
    box.fill(f"{value:.3f}")
    box.press("Enter")
    if caption:
        page.locator("#gallery caption").get_by_text(f"threshold {value:.3f}").wait_for()


def _images(batch: dict[str, Path]) -> list[Path]:
    return sorted(batch["images"].glob("*.png"))


def _scores_by_name(path: Path) -> dict[str, tuple[float, str]]:
    with path.open(newline="") as file:
        return {Path(row["path"]).name: (float(row["score"]), row["decision"]) for row in csv.DictReader(file)}


def test_start_up_to_a_usable_page_is_quick(app: dict[str, object]) -> None:
    print(f"anomalyclip-app start-up to a usable page: {app['start_up_s']:.1f} s")
    assert app["start_up_s"] < START_UP_LIMIT_S


def test_zero_shot_batch_matches_anomalib_predict_and_the_threshold_relabels(
    page: object, batch: dict[str, Path], tiny_clip_path: Path
) -> None:
    images = _images(batch)
    assert len(images) == 8
    _upload(page, "images", images)

    def page_answers_while_scoring() -> None:
        _set_threshold(page, 0.7, caption=False)
        page.locator("#histogram").get_by_text("threshold 0.700").wait_for(timeout=5_000)
        assert "Running:" in page.locator("#status").inner_text()

    _run(page, expected_rows=8, while_running=page_answers_while_scoring)
    page.locator("#gallery caption").get_by_text("threshold 0.700").wait_for()  # the slider's value when it ended
    _set_threshold(page, 0.5)
    assert "zero-shot" in page.locator("#status").inner_text()
    rows = _rows(page)
    assert sorted(name for name, _, _ in rows) == sorted(path.name for path in images)
    scores = [score for _, score, _ in rows]
    assert scores == sorted(scores, reverse=True)
    pictures = page.locator("#gallery img")
    assert pictures.count() == 8
    assert all(picture.evaluate("image => image.complete && image.naturalWidth > 0") for picture in pictures.all())

    with page.expect_download() as download:
        page.locator("#csv a").first.click()
    page_csv = batch["root"] / "page_predictions.csv"
    download.value.save_as(page_csv)
    assert download.value.suggested_filename == "predictions.csv"
    anomalib_cli(
        "predict", "--model", "AnomalyCLIP", *_model_words(tiny_clip_path, batch["prompts"]),
        "--data", "anomalib_anomalyclip.data.PredictFolder", "--data.path", str(batch["images"]),
        "--default_root_dir", str(batch["root"] / "cli_results"), cwd=batch["root"],
    )  # fmt: skip
    (cli_csv,) = (batch["root"] / "cli_results").rglob("latest/predictions.csv")
    from_page, from_cli = _scores_by_name(page_csv), _scores_by_name(cli_csv)
    assert from_page.keys() == from_cli.keys()
    for name, (score, decision) in from_cli.items():
        assert abs(from_page[name][0] - score) <= 1e-6, name
        assert from_page[name][1] == decision, name

    middle = (scores[3] + scores[4]) / 2  # four above, four below
    _set_threshold(page, middle)
    decisions = [decision for _, _, decision in _rows(page)]
    assert decisions == ["anomalous"] * 4 + ["normal"] * 4
    assert [decision for _, _, decision in rows] != decisions  # the model's threshold labelled them otherwise
    assert f"threshold {middle:.3f}" in page.locator("#histogram").inner_html()
    with page.expect_download() as download:
        page.locator("#csv a").first.click()
    download.value.save_as(page_csv)
    assert sorted(decision for (decision,) in ((row[1],) for row in _scores_by_name(page_csv).values())) == sorted(
        decisions
    )
    with page.expect_download() as download:
        page.locator("#zip a").first.click()
    assert download.value.suggested_filename == "overlays.zip"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    offline = {urlparse(url).hostname for url in page.requests} - {"127.0.0.1", "localhost", None}
    assert not offline, f"the page fetched from {offline}"


def test_few_shot_uses_the_uploaded_references(page: object, batch: dict[str, Path]) -> None:
    references = sorted(batch["references"].glob("*.png"))
    page.locator("#folder textarea, #folder input").first.fill(str(batch["images"]))  # a folder on the server
    _upload(page, "references", references)
    page.locator("#k-shot").get_by_text("k = 3").wait_for()
    _run(page, expected_rows=8)
    assert "few-shot (k = 3)" in page.locator("#status").inner_text()
    scores = [score for _, score, _ in _rows(page)]
    assert len(scores) == 8
    assert scores == sorted(scores, reverse=True)


def test_mutual_scoring_scores_the_batch_and_refuses_a_small_pool(page: object, batch: dict[str, Path]) -> None:
    page.locator("#mutual input").check()
    _upload(page, "images", _images(batch))
    _run(page, expected_rows=8)
    scores = [score for _, score, _ in _rows(page)]
    assert len(scores) == 8
    assert scores == sorted(scores, reverse=True)

    page.reload()
    page.locator("#mutual input").check()
    _upload(page, "images", _images(batch)[:3])
    _run(page, expected_rows=None)
    message = page.locator("#problems").inner_text()
    assert "needs at least 5 images per pool" in message
    assert page.locator("#gallery tr[data-score]").count() == 0


def test_a_corrupt_file_is_listed_and_the_others_are_scored(page: object, batch: dict[str, Path]) -> None:
    _upload(page, "images", [*_images(batch), batch["broken"]])
    _run(page, expected_rows=8)
    assert len(_rows(page)) == 8
    problems = page.locator("#problems").inner_text()
    assert "broken.png" in problems
    assert "the file is truncated" in problems or "not an image file" in problems
