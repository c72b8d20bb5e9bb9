"""Finding AnomalyCLIP prompt checkpoints: local files, URLs and the authors' released prompts.

``prompt_weights`` can be given in three ways:

* a local file path, used as it is;
* an ``http(s)`` URL, downloaded once into the cache. A checksum can be appended as a URL
  fragment, ``https://host/prompts.pth#sha256=<hex>``; the download is verified with it;
* the short name of a prompt checkpoint released by the AnomalyCLIP authors (see
  :data:`RELEASED_PROMPTS`), downloaded once into the cache and verified with its git blob SHA-1.

Downloads are kept in the ``cache_dir`` argument, else in the package's cache (``prompts/`` below
:func:`anomalib_anomalyclip.cache.cache_root`). Without a network connection, copy the file into the cache path
named in the error message, or pass its local path with ``--model.prompt_weights``.

Example:
    >>> from anomalib_anomalyclip.weights import resolve_prompt_weights
    >>> path = resolve_prompt_weights("anomalyclip-visa")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO, Literal, cast

from tqdm.auto import tqdm

from anomalib_anomalyclip.cache import CACHE_ENV_VAR
from anomalib_anomalyclip.cache import cache_dir as cache_dir_of_kind
from anomalib_anomalyclip.errors import PromptWeightsError

logger = logging.getLogger(__name__)

ChecksumKind = Literal["git-blob-sha1", "sha256"]

"""Environment variable that overrides the default cache directory."""

DOWNLOAD_TIMEOUT_S = 30.0
"""Default timeout, in seconds, for connecting to the server and for each read."""

_CHUNK_BYTES = 1 << 20
_HEX_LENGTHS: dict[str, int] = {"git-blob-sha1": 40, "sha256": 64}
_SOURCE_COMMIT = "45ed4dd35c05797d854294b5e8d585c545920089"
_SOURCE_URL = f"https://github.com/zqhang/AnomalyCLIP/raw/{_SOURCE_COMMIT}"
_USER_AGENT = "anomalib-anomalyclip"


@dataclass(frozen=True)
class ReleasedPrompts:
    """A prompt checkpoint released by the AnomalyCLIP authors.

    Attributes:
        name: short name accepted by :func:`resolve_prompt_weights`.
        url: where the checkpoint is downloaded from.
        checksum: expected checksum of the file, lower-case hex.
        checksum_kind: ``"git-blob-sha1"`` (the object id git gives the content: SHA-1 of
            ``blob <size>``, a NUL byte, then the data) or ``"sha256"`` (SHA-256 of the data).
        trained_on: dataset the prompts were trained on.
        description: one-line summary shown in messages.
    """

    name: str
    url: str
    checksum: str
    checksum_kind: ChecksumKind
    trained_on: str
    description: str

    @property
    def filename(self) -> str:
        """Name of the cached file."""
        return f"{self.name}.pth"


RELEASED_PROMPTS: dict[str, ReleasedPrompts] = {
    entry.name: entry
    for entry in (
        ReleasedPrompts(
            name="anomalyclip-visa",
            url=f"{_SOURCE_URL}/checkpoints/9_12_4_multiscale/epoch_15.pth",
            checksum="c90f1d9d92d158b436a8fc193f984d4cec8b1fc8",
            checksum_kind="git-blob-sha1",
            trained_on="VisA",
            description="prompts trained on VisA; the authors use them for zero-shot MVTec AD",
        ),
        ReleasedPrompts(
            name="anomalyclip-mvtec",
            url=f"{_SOURCE_URL}/checkpoints/9_12_4_multiscale_visa/epoch_15.pth",
            checksum="72adc786e031b49ea288ba5f815f0d38cf158708",
            checksum_kind="git-blob-sha1",
            trained_on="MVTec AD",
            description="prompts trained on MVTec AD; the authors use them for VisA and all other datasets",
        ),
    )
}
"""Prompt checkpoints released in zqhang/AnomalyCLIP, by short name (named after the training data)."""


@dataclass(frozen=True)
class _Download:
    """Everything needed to fetch one file into the cache."""

    url: str
    destination: Path
    checksum: str | None
    checksum_kind: ChecksumKind | None
    label: str  # " 'short-name' (description)" for released prompts, "" for other URLs


def resolve_prompt_weights(
    spec: str | os.PathLike | None,
    cache_dir: str | os.PathLike | None = None,
    *,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path | None:
    """Turn a ``prompt_weights`` value into the path of a local file.

    Args:
        spec: ``None``, a local file path, an ``http(s)`` URL (optionally ending in
            ``#sha256=<hex>`` or ``#git-blob-sha1=<hex>``) or a short name from
            :data:`RELEASED_PROMPTS`.
        cache_dir: where downloads are kept; ``None`` uses :func:`prompt_cache_dir`.
        timeout: network timeout in seconds.

    Returns:
        ``None`` if ``spec`` is ``None``, otherwise the path of an existing file.

    Raises:
        PromptWeightsError: the file does not exist, the name is unknown, the download failed
            (the message explains how to proceed offline) or the checksum does not match.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        return _local_file(Path(spec).expanduser())
    text = spec.strip()
    if _is_http_url(text):
        return _ensure_cached(_url_download(text, prompt_cache_dir(cache_dir)), timeout)
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    if text in RELEASED_PROMPTS:
        return _ensure_cached(_released_download(RELEASED_PROMPTS[text], prompt_cache_dir(cache_dir)), timeout)
    if "://" in text:
        raise PromptWeightsError(f"Cannot download '{text}': only http and https URLs are supported.")
    return _local_file(Path(text).expanduser(), original=spec)


def released_prompts_for(datamodule: object) -> ReleasedPrompts:
    """The released prompts to use zero-shot on ``datamodule``: those trained on the other dataset.

    ``anomalyclip-visa`` for MVTec AD (and datamodules derived from anomalib's ``MVTecAD``),
    ``anomalyclip-mvtec`` for everything else, as the authors evaluate.
    """
    return released_prompts_for_class(type(datamodule))


def released_prompts_for_class(datamodule_class: type) -> ReleasedPrompts:
    """:func:`released_prompts_for` from the datamodule's class (before it is built)."""
    names = {cls.__name__ for cls in datamodule_class.__mro__}
    return RELEASED_PROMPTS["anomalyclip-visa" if names & {"MVTecAD", "MVTec"} else "anomalyclip-mvtec"]


def prompt_weights_problem(spec: str | None, cache_dir: str | None, online: bool) -> str | None:
    """What is missing for ``prompt_weights=spec`` on this machine, without downloading (``None``: nothing).

    A released name or URL is fine when cached, or when ``online`` (it is downloaded at the start of the run).

    Args:
        spec: the ``prompt_weights`` value.
        cache_dir: the download cache (``None``: the package cache).
        online: whether downloads can work.
    """
    if spec is None:
        return None
    text = str(spec).strip()
    if _is_http_url(text) or text in RELEASED_PROMPTS:
        cache = prompt_cache_dir(cache_dir)
        plan = (
            _released_download(RELEASED_PROMPTS[text], cache)
            if text in RELEASED_PROMPTS
            else _url_download(text, cache)
        )
        if plan.destination.is_file() or online:
            return None
        return (
            f"the prompts{plan.label}: not in the cache ({plan.destination}) and there is no network. Download "
            f"{plan.url} elsewhere and copy it to that path, or pass the file: --model.prompt_weights "
            f"/path/to/{_example_filename(plan)}"
        )
    if Path(text).expanduser().is_file():
        return None
    return f"the prompts: no file '{text}'. Pass an existing prompt file with --model.prompt_weights"


def prompt_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory where downloaded prompt checkpoints are kept: ``cache_dir``, else the package cache's ``prompts/``."""
    return cache_dir_of_kind("prompts", cache_dir)


def file_checksum(path: str | os.PathLike, kind: ChecksumKind) -> str:
    """Checksum of a file, read in chunks.

    Args:
        path: file to hash.
        kind: ``"sha256"`` or ``"git-blob-sha1"`` (the object id git gives the file's content).

    Returns:
        Lower-case hex digest.

    Raises:
        ValueError: ``kind`` is not a supported checksum kind.
    """
    if kind == "sha256":
        digest = hashlib.sha256()
    elif kind == "git-blob-sha1":
        digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    else:
        raise ValueError(f"Unknown checksum kind '{kind}'; expected one of {sorted(_HEX_LENGTHS)}.")
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def available_prompts() -> str:
    """One line per released prompt checkpoint: short name, training data and use."""
    return "\n".join(f"  {entry.name}: {entry.description}" for entry in RELEASED_PROMPTS.values())


# --- local paths -------------------------------------------------------------------------------


def _local_file(path: Path, original: str | None = None) -> Path:
    """Return ``path`` if it is an existing file, otherwise raise a helpful error."""
    if path.is_file():
        return path
    if original is not None and not _looks_like_path(original):
        raise PromptWeightsError(
            f"Unknown prompt weights '{original}'. Pass the path of a checkpoint file, an http(s) URL, "
            f"or one of the released short names:\n{available_prompts()}"
        )
    if path.is_dir():
        raise PromptWeightsError(f"Prompt weights path '{path}' is a directory; pass the checkpoint file inside it.")
    raise PromptWeightsError(
        f"Prompt weights file '{path}' does not exist. Pass the path of an existing checkpoint file, "
        f"an http(s) URL, or one of the released short names:\n{available_prompts()}"
    )


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` reads as a file path rather than a (mistyped) short name."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in separators) or text.startswith(("~", ".")) or bool(Path(text).suffix)


# --- URLs and cache paths ----------------------------------------------------------------------


def _is_http_url(text: str) -> bool:
    """Whether ``text`` is an http or https URL."""
    return urllib.parse.urlsplit(text).scheme.lower() in {"http", "https"}


def _released_download(
    entry: ReleasedPrompts, cache_dir: Path, checksum: tuple[ChecksumKind, str] | None = None
) -> _Download:
    """Download plan for a released checkpoint, optionally with an explicit checksum."""
    kind, value = checksum if checksum is not None else (entry.checksum_kind, entry.checksum)
    label = f" '{entry.name}' ({entry.description})"
    return _Download(entry.url, cache_dir / entry.filename, value, kind, label)


def _url_download(url: str, cache_dir: Path) -> _Download:
    """Download plan for a URL; released URLs share the short name's cache file and checksum."""
    bare_url, fragment = urllib.parse.urldefrag(url)
    checksum = _parse_checksum_fragment(fragment, url)
    for entry in RELEASED_PROMPTS.values():
        if entry.url == bare_url:
            return _released_download(entry, cache_dir, checksum)
    kind, value = checksum if checksum is not None else (None, None)
    return _Download(bare_url, cache_dir / _url_filename(bare_url), value, kind, "")


def _parse_checksum_fragment(fragment: str, url: str) -> tuple[ChecksumKind, str] | None:
    """Parse ``sha256=<hex>`` or ``git-blob-sha1=<hex>`` from a URL fragment."""
    if not fragment:
        return None
    kind, _, value = fragment.partition("=")
    kind, value = kind.strip().lower(), value.strip().lower()
    expected_length = _HEX_LENGTHS.get(kind)
    if expected_length is None or not re.fullmatch(rf"[0-9a-f]{{{expected_length}}}", value):
        raise PromptWeightsError(
            f"Cannot read the checksum in '{url}': expected the URL to end in '#sha256=<64 hex digits>' "
            f"or '#git-blob-sha1=<40 hex digits>', got '#{fragment}'."
        )
    return cast(ChecksumKind, kind), value


def _url_filename(url: str) -> str:
    """Cache file name for a URL: a hash of the full URL followed by its (sanitised) base name."""
    url_hash = hashlib.sha256(url.encode()).hexdigest()[:16]
    basename = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename).lstrip(".")[-80:] or "prompts.pth"
    return f"url-{url_hash}-{basename}"


# --- cache and verification --------------------------------------------------------------------


def _ensure_cached(download: _Download, timeout: float) -> Path:
    """Return the cached file, downloading it if absent or re-downloading it once if corrupt."""
    destination = download.destination
    stale_reason = None
    if destination.is_file():
        stale_reason = _checksum_problem(destination, download)
        if stale_reason is None:
            return destination
        logger.warning("Cached prompt weights %s: %s. Downloading them again.", destination, stale_reason)
    _download_verified(download, timeout, stale_reason)
    return destination


def _checksum_problem(path: Path, download: _Download) -> str | None:
    """Describe how ``path`` fails the expected checksum, or return ``None`` if it passes."""
    if download.checksum is None or download.checksum_kind is None:
        return None
    actual = file_checksum(path, download.checksum_kind)
    if actual == download.checksum:
        return None
    return f"{download.checksum_kind} is {actual}, expected {download.checksum}"


def _download_verified(download: _Download, timeout: float, stale_reason: str | None) -> None:
    """Download into a temporary file, verify it, then move it atomically into the cache."""
    destination = download.destination
    temp_path = _temp_file_beside(destination)
    try:
        try:
            _fetch(download.url, temp_path, timeout)
        except (OSError, HTTPException) as error:
            raise PromptWeightsError(_offline_message(download, error, stale_reason)) from error
        problem = _checksum_problem(temp_path, download)
        if problem is not None:
            raise PromptWeightsError(_mismatch_message(download, problem, stale_reason))
        os.replace(temp_path, destination)
    finally:
        temp_path.unlink(missing_ok=True)


def _temp_file_beside(destination: Path) -> Path:
    """Create the cache directory and an empty temporary file in it, or explain how to choose another one."""
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    except OSError as error:
        raise PromptWeightsError(
            f"Cannot write to the prompt weights cache '{destination.parent}': {error}. Choose another directory with "
            f"the {CACHE_ENV_VAR} environment variable, or pass a local file with --model.prompt_weights."
        ) from error
    os.close(descriptor)
    return Path(temp_name)


def _mismatch_message(download: _Download, problem: str, stale_reason: str | None) -> str:
    """Error message for a download whose checksum does not match."""
    cached = f" The cached file '{download.destination}' failed too ({stale_reason})." if stale_reason else ""
    return (
        f"The prompt weights{download.label} downloaded from {download.url} failed verification: {problem}. "
        f"The file was not saved to '{download.destination}'.{cached} The file on the server may have changed "
        f"or the download was altered; check the URL, or pass a verified local file with "
        f"--model.prompt_weights /path/to/{_example_filename(download)}."
    )


def _offline_message(download: _Download, error: BaseException, stale_reason: str | None) -> str:
    """Error message for a failed download, explaining how to provide the file offline."""
    filename = _example_filename(download)
    cached = f"The cached file '{download.destination}' is not usable ({stale_reason}).\n" if stale_reason else ""
    verify = f" (it is verified with its {download.checksum_kind} {download.checksum})" if download.checksum else ""
    return (
        f"Could not download the prompt weights{download.label} from {download.url}: {error}.\n{cached}"
        "This machine may be offline. To use these prompt weights without a network connection, either:\n"
        f"  1. download {download.url} on a machine with internet access and copy the file to\n"
        f"     {download.destination}\n"
        f"     so that it is found in the cache{verify}; or\n"
        f"  2. pass the downloaded file directly: --model.prompt_weights /path/to/{filename}"
    )


def _example_filename(download: _Download) -> str:
    """File name to show in examples: the last part of the URL path."""
    return Path(urllib.parse.urlsplit(download.url).path).name or "prompts.pth"


# --- network -----------------------------------------------------------------------------------


def _open_url(url: str, timeout: float) -> IO[bytes]:
    """Open ``url`` for reading; the only place that touches the network (tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)


def _fetch(url: str, destination: Path, timeout: float) -> None:
    """Download ``url`` into ``destination`` with a progress bar.

    Args:
        url: http(s) URL.
        destination: file to write (overwritten).
        timeout: seconds to wait for the connection and for each read.

    Raises:
        OSError: network failure (``urllib.error.URLError``, timeouts) or a truncated download.
    """
    with _open_url(url, timeout) as response, open(destination, "wb") as output:
        total = _content_length(response)
        written = _copy_with_progress(response, output, total, desc=Path(destination).name)
    if total is not None and written != total:
        raise ConnectionError(f"download interrupted after {written} of {total} bytes")


def _content_length(response: IO[bytes]) -> int | None:
    """Size announced by the server, if any."""
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value is not None and str(value).isdigit() else None


def _copy_with_progress(source: IO[bytes], target: IO[bytes], total: int | None, desc: str) -> int:
    """Copy ``source`` to ``target`` in chunks, updating a tqdm bar; return the bytes copied."""
    written = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False) as bar:
        for chunk in iter(functools.partial(source.read, _CHUNK_BYTES), b""):
            target.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written
