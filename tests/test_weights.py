"""Resolving prompt weights: local files, URLs, released short names, the cache and offline errors.

No test opens a socket: ``weights._fetch`` is replaced by fakes, and an autouse fixture makes any
real connection attempt fail loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest

from anomalib_anomalyclip import weights
from anomalib_anomalyclip.weights import (
    RELEASED_PROMPTS,
    PromptWeightsError,
    ReleasedPrompts,
    file_checksum,
    prompt_cache_dir,
    resolve_prompt_weights,
)

GOOD = b"fake prompt checkpoint\n" * 10
BAD = b"tampered checkpoint\n"
URL = "https://example.invalid/models/prompts.pth"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


class FakeFetch:
    """Stand-in for ``weights._fetch`` that writes fixed bytes (or raises) and records its calls."""

    def __init__(self, data: bytes | None = GOOD, error: BaseException | None = None) -> None:
        self.data = data
        self.error = error
        self.calls: list[tuple[str, Path, float]] = []

    def __call__(self, url: str, destination: Path, timeout: float) -> None:
        self.calls.append((url, Path(destination), timeout))
        if self.error is not None:
            raise self.error
        Path(destination).write_bytes(self.data)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail any real connection and keep the default cache inside ``tmp_path``."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv(weights.CACHE_ENV_VAR, str(tmp_path / "env_cache"))


@pytest.fixture
def install_fetch(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeFetch]:
    """Replace ``weights._fetch`` with a :class:`FakeFetch` built from the given arguments."""

    def install(data: bytes | None = GOOD, error: BaseException | None = None) -> FakeFetch:
        fake = FakeFetch(data, error)
        monkeypatch.setattr(weights, "_fetch", fake)
        return fake

    return install


@pytest.fixture
def released_good(monkeypatch: pytest.MonkeyPatch) -> ReleasedPrompts:
    """``anomalyclip-visa`` with its checksum replaced by the git blob SHA-1 of ``GOOD``."""
    entry = dataclasses.replace(RELEASED_PROMPTS["anomalyclip-visa"], checksum=_git_blob_sha1(GOOD))
    monkeypatch.setitem(RELEASED_PROMPTS, entry.name, entry)
    return entry


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".part"))


# --- registry and checksums --------------------------------------------------------------------


def test_registry_names_say_what_the_prompts_were_trained_on() -> None:
    assert set(RELEASED_PROMPTS) == {"anomalyclip-visa", "anomalyclip-mvtec"}
    visa, mvtec = RELEASED_PROMPTS["anomalyclip-visa"], RELEASED_PROMPTS["anomalyclip-mvtec"]
    assert visa.trained_on == "VisA"
    assert visa.url.endswith("/checkpoints/9_12_4_multiscale/epoch_15.pth")
    assert visa.checksum == "c90f1d9d92d158b436a8fc193f984d4cec8b1fc8"
    assert mvtec.trained_on == "MVTec AD"
    assert mvtec.url.endswith("/checkpoints/9_12_4_multiscale_visa/epoch_15.pth")
    assert mvtec.checksum == "72adc786e031b49ea288ba5f815f0d38cf158708"
    for entry in RELEASED_PROMPTS.values():
        assert entry.url.startswith(
            "https://github.com/zqhang/AnomalyCLIP/raw/45ed4dd35c05797d854294b5e8d585c545920089/"
        )
        assert entry.checksum_kind == "git-blob-sha1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        visa.checksum = "0"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"),  # `git hash-object` of an empty file
        (b"hello\n", "ce013625030ba8dba906f756967f9e9ca394464a"),  # `echo hello | git hash-object --stdin`
    ],
)
def test_git_blob_sha1_matches_git(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_checksum(path, "git-blob-sha1") == expected


def test_sha256_checksum(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(GOOD)
    assert file_checksum(path, "sha256") == _sha256(GOOD)
    with pytest.raises(ValueError, match="Unknown checksum kind"):
        file_checksum(path, "md5")  # type: ignore[arg-type]


# --- local paths and bad specs -----------------------------------------------------------------


def test_none_gives_none() -> None:
    assert resolve_prompt_weights(None) is None


def test_local_path_is_passed_through(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    path = tmp_path / "epoch_15.pth"
    path.write_bytes(GOOD)
    assert resolve_prompt_weights(path) == path
    assert resolve_prompt_weights(str(path)) == path
    assert fetch.calls == []


def test_existing_file_wins_over_a_short_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, install_fetch: Callable[..., FakeFetch]
) -> None:
    fetch = install_fetch()
    monkeypatch.chdir(tmp_path)
    Path("anomalyclip-visa").write_bytes(GOOD)
    assert resolve_prompt_weights("anomalyclip-visa") == Path("anomalyclip-visa")
    assert fetch.calls == []


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "epoch_15.pth"
    with pytest.raises(PromptWeightsError, match="does not exist") as info:
        resolve_prompt_weights(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(PromptWeightsError, match="does not exist"):
        resolve_prompt_weights(missing)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PromptWeightsError, match="is a directory"):
        resolve_prompt_weights(tmp_path)


@pytest.mark.parametrize("spec", ["anomalyclip", "visa", "", "ANOMALYCLIP_VISA"])
def test_unknown_spec_lists_the_short_names(spec: str) -> None:
    with pytest.raises(PromptWeightsError, match="Unknown prompt weights") as info:
        resolve_prompt_weights(spec)
    message = str(info.value)
    assert "anomalyclip-visa" in message
    assert "anomalyclip-mvtec" in message
    assert "path" in message


def test_error_is_a_value_error() -> None:
    assert issubclass(PromptWeightsError, ValueError)


def test_unsupported_scheme() -> None:
    with pytest.raises(PromptWeightsError, match="only http and https"):
        resolve_prompt_weights("ftp://example.invalid/prompts.pth")


@pytest.mark.parametrize("fragment", ["sha256=abc", "md5=" + "0" * 32, "sha256=" + "z" * 64, "checksum"])
def test_malformed_checksum_fragment(tmp_path: Path, fragment: str) -> None:
    with pytest.raises(PromptWeightsError, match="Cannot read the checksum"):
        resolve_prompt_weights(f"{URL}#{fragment}", cache_dir=tmp_path)


# --- cache directory ---------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert prompt_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert prompt_cache_dir() == tmp_path / "env_cache" / "prompts"
    monkeypatch.delenv(weights.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prompt_cache_dir() == tmp_path / "xdg" / "anomalib_anomalyclip" / "prompts"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prompt_cache_dir() == tmp_path / "home" / ".cache" / "anomalib_anomalyclip" / "prompts"


def test_env_var_cache_is_used(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    fetch = install_fetch()
    path = resolve_prompt_weights(released_good.name)
    assert path == tmp_path / "env_cache" / "prompts" / "anomalyclip-visa.pth"
    assert path.read_bytes() == GOOD
    assert len(fetch.calls) == 1


def test_unusable_cache_dir_is_explained(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    blocker = tmp_path / "not_a_directory"
    blocker.write_bytes(b"")
    with pytest.raises(PromptWeightsError, match="Cannot write to the prompt weights cache") as info:
        resolve_prompt_weights(URL, cache_dir=blocker / "cache")
    assert weights.CACHE_ENV_VAR in str(info.value)
    assert fetch.calls == []


# --- short names -------------------------------------------------------------------------------


def test_short_name_served_from_prefilled_cache(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    fetch = install_fetch(error=AssertionError("must not download"))
    cached = tmp_path / "anomalyclip-visa.pth"
    cached.write_bytes(GOOD)
    assert resolve_prompt_weights("anomalyclip-visa", cache_dir=tmp_path) == cached
    assert fetch.calls == []


def test_short_name_is_downloaded_from_the_release_and_verified(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    fetch = install_fetch()
    path = resolve_prompt_weights(" anomalyclip-visa ", cache_dir=tmp_path)
    assert path == tmp_path / "anomalyclip-visa.pth"
    assert fetch.calls[0][0] == released_good.url
    assert fetch.calls[0][2] == weights.DOWNLOAD_TIMEOUT_S
    assert _leftovers(tmp_path) == []


def test_real_registry_checksum_rejects_other_content(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    with pytest.raises(PromptWeightsError, match="failed verification") as info:
        resolve_prompt_weights("anomalyclip-mvtec", cache_dir=tmp_path)
    assert "72adc786e031b49ea288ba5f815f0d38cf158708" in str(info.value)
    assert len(fetch.calls) == 1
    assert not (tmp_path / "anomalyclip-mvtec.pth").exists()
    assert _leftovers(tmp_path) == []


def test_released_url_shares_the_short_name_cache_and_checksum(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    fetch = install_fetch()
    by_url = resolve_prompt_weights(released_good.url, cache_dir=tmp_path)
    by_name = resolve_prompt_weights(released_good.name, cache_dir=tmp_path)
    assert by_url == by_name == tmp_path / "anomalyclip-visa.pth"
    assert len(fetch.calls) == 1

    fetch.data = BAD
    (tmp_path / "anomalyclip-visa.pth").write_bytes(BAD)
    with pytest.raises(PromptWeightsError, match="failed verification"):
        resolve_prompt_weights(released_good.url, cache_dir=tmp_path)


# --- URLs --------------------------------------------------------------------------------------


def test_url_download_lands_in_cache_and_is_reused(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    spec = f"{URL}#sha256={_sha256(GOOD)}"
    first = resolve_prompt_weights(spec, cache_dir=tmp_path)
    second = resolve_prompt_weights(spec, cache_dir=tmp_path)
    assert first == second
    assert first.parent == tmp_path
    assert first.name.endswith("prompts.pth")
    assert first.read_bytes() == GOOD
    assert [call[0] for call in fetch.calls] == [URL]  # fragment stripped, fetched once
    assert _leftovers(tmp_path) == []


def test_url_without_checksum_is_cached(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    first = resolve_prompt_weights(URL, cache_dir=tmp_path)
    assert resolve_prompt_weights(URL, cache_dir=tmp_path) == first
    assert len(fetch.calls) == 1


def test_uppercase_checksum_and_git_blob_fragment(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    install_fetch()
    assert resolve_prompt_weights(f"{URL}#sha256={_sha256(GOOD).upper()}", cache_dir=tmp_path) is not None
    other = "https://example.invalid/other/prompts.pth"
    assert resolve_prompt_weights(f"{other}#git-blob-sha1={_git_blob_sha1(GOOD)}", cache_dir=tmp_path) is not None


def test_different_urls_never_collide(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    install_fetch()
    paths = {
        resolve_prompt_weights(url, cache_dir=tmp_path)
        for url in (
            "https://a.invalid/prompts.pth",
            "https://b.invalid/prompts.pth",
            "https://a.invalid/prompts.pth?version=2",
            "https://a.invalid/",
        )
    }
    assert len(paths) == 4
    assert all(path.parent == tmp_path and not path.name.startswith(".") for path in paths)


def test_corrupt_cache_is_redownloaded(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch()
    spec = f"{URL}#sha256={_sha256(GOOD)}"
    cached = resolve_prompt_weights(spec, cache_dir=tmp_path)
    cached.write_bytes(BAD)
    assert resolve_prompt_weights(spec, cache_dir=tmp_path) == cached
    assert cached.read_bytes() == GOOD
    assert len(fetch.calls) == 2


def test_checksum_mismatch_redownloads_once_then_fails(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    fetch = install_fetch(data=GOOD)
    spec = f"{URL}#sha256={_sha256(GOOD)}"
    cached = resolve_prompt_weights(spec, cache_dir=tmp_path)
    cached.write_bytes(BAD)
    fetch.data = BAD  # the server now serves different content
    with pytest.raises(PromptWeightsError, match="failed verification") as info:
        resolve_prompt_weights(spec, cache_dir=tmp_path)
    message = str(info.value)
    assert str(cached) in message
    assert URL in message
    assert _sha256(GOOD) in message and _sha256(BAD) in message
    assert len(fetch.calls) == 2  # first download, then exactly one re-download
    assert _leftovers(tmp_path) == []


def test_fresh_download_with_wrong_checksum_is_not_cached(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch]
) -> None:
    fetch = install_fetch(data=BAD)
    spec = f"{URL}#sha256={_sha256(GOOD)}"
    with pytest.raises(PromptWeightsError, match="was not saved"):
        resolve_prompt_weights(spec, cache_dir=tmp_path)
    assert len(fetch.calls) == 1
    assert list(tmp_path.iterdir()) == []


# --- offline -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
        urllib.error.HTTPError(URL, 404, "Not Found", {}, io.BytesIO()),  # type: ignore[arg-type]
        TimeoutError("timed out"),
        ConnectionResetError("reset"),
    ],
)
def test_offline_error_explains_what_to_do(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], error: BaseException
) -> None:
    install_fetch(error=error)
    entry = RELEASED_PROMPTS["anomalyclip-visa"]
    with pytest.raises(PromptWeightsError) as info:
        resolve_prompt_weights("anomalyclip-visa", cache_dir=tmp_path)
    message = str(info.value)
    assert entry.url in message
    assert str(tmp_path / "anomalyclip-visa.pth") in message
    assert "--model.prompt_weights /path/to/epoch_15.pth" in message
    assert "anomalyclip-visa" in message and "VisA" in message
    assert info.value.__cause__ is error
    assert _leftovers(tmp_path) == []


def test_offline_instructions_work(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    """Copying the file to the cache path named in the offline error makes the short name work."""
    install_fetch(error=urllib.error.URLError("no network"))
    with pytest.raises(PromptWeightsError) as info:
        resolve_prompt_weights(released_good.name, cache_dir=tmp_path)
    destination = tmp_path / "anomalyclip-visa.pth"
    assert str(destination) in str(info.value)
    destination.write_bytes(GOOD)
    assert resolve_prompt_weights(released_good.name, cache_dir=tmp_path) == destination


def test_offline_custom_url_message(tmp_path: Path, install_fetch: Callable[..., FakeFetch]) -> None:
    install_fetch(error=urllib.error.URLError("no network"))
    spec = f"{URL}#sha256={_sha256(GOOD)}"
    with pytest.raises(PromptWeightsError) as info:
        resolve_prompt_weights(spec, cache_dir=tmp_path)
    message = str(info.value)
    assert URL in message
    assert str(tmp_path) in message
    assert "--model.prompt_weights /path/to/prompts.pth" in message


def test_offline_with_corrupt_cache_mentions_the_cached_file(
    tmp_path: Path, install_fetch: Callable[..., FakeFetch], released_good: ReleasedPrompts
) -> None:
    install_fetch(error=urllib.error.URLError("no network"))
    cached = tmp_path / "anomalyclip-visa.pth"
    cached.write_bytes(BAD)
    with pytest.raises(PromptWeightsError, match="is not usable") as info:
        resolve_prompt_weights(released_good.name, cache_dir=tmp_path)
    assert str(cached) in str(info.value)
    assert cached.read_bytes() == BAD  # left alone: nothing better to replace it with


# --- the download function itself --------------------------------------------------------------


class FakeResponse(io.BytesIO):
    """Minimal ``urlopen`` response: a byte stream with headers."""

    def __init__(self, data: bytes, content_length: int | None) -> None:
        super().__init__(data)
        self.headers = {} if content_length is None else {"Content-Length": str(content_length)}


def _fake_opener(data: bytes, content_length: int | None) -> Callable[[str, float], FakeResponse]:
    def open_url(url: str, timeout: float) -> FakeResponse:
        assert url == URL
        assert timeout == 5.0
        return FakeResponse(data, content_length)

    return open_url


@pytest.mark.parametrize("content_length", [len(GOOD), None])
def test_fetch_writes_the_response(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content_length: int | None) -> None:
    monkeypatch.setattr(weights, "_open_url", _fake_opener(GOOD, content_length))
    destination = tmp_path / "out.pth"
    weights._fetch(URL, destination, 5.0)
    assert destination.read_bytes() == GOOD


def test_truncated_fetch_is_a_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_open_url", _fake_opener(GOOD[:10], len(GOOD)))
    with pytest.raises(ConnectionError, match="interrupted"):
        weights._fetch(URL, tmp_path / "out.pth", 5.0)


def test_truncated_download_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_open_url", _fake_opener(GOOD[:10], len(GOOD)))
    with pytest.raises(PromptWeightsError, match="interrupted") as info:
        resolve_prompt_weights(URL, cache_dir=tmp_path, timeout=5.0)
    assert "--model.prompt_weights" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_real_opener_is_guarded_by_the_no_network_fixture(tmp_path: Path) -> None:
    """Sanity check of the fixture: the real download path reaches the guard, which is not swallowed."""
    with pytest.raises(AssertionError, match="must not open network connections"):
        resolve_prompt_weights("https://192.0.2.1/prompts.pth", cache_dir=tmp_path, timeout=1.0)
    assert _leftovers(tmp_path) == []
