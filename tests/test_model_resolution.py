"""Tests of the CASCADE model-resolution stage (--model_dir, cache, download, auto, builtin).

No real network: downloads are served by a local HTTP server on 127.0.0.1, and
"refused" URLs point to a port that was just released.
"""

from __future__ import annotations

import http.server
import logging
import os
import random
import socket
import threading
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from conftest import shared_dir  # noqa: E402

from unified_spike_processing_coo import (  # noqa: E402
    AUTO_MODEL_KEYWORD,
    FALLBACK_SOURCE_PREFIX,
    OFFICIAL_GLOBAL_EXC_MODELS,
    OFFICIAL_MODEL_INDEX_URL,
    ModelChoice,
    ModelDownloadError,
    ModelResolutionError,
    choose_auto_model_name,
    download_model,
    find_model_folder,
    is_complete_model_folder,
    model_folder_problem,
    parse_model_index,
    parse_model_sampling_rate_hz,
    parse_model_smoothing_ms,
    resolve_model,
)

SHARED_MODELS = shared_dir() / "cascade" / "Pretrained_models"
MODEL = "Global_EXC_2Hz_smoothing500ms"
TIMEOUT = 5.0

CONFIG_TEMPLATE = """\
# Main parameter of this model:

model_name: {name}                      # Name of the model
sampling_rate: {rate}                                # Sampling rate in Hz
training_datasets:
- DS03-OGB1-zf-pDp
placeholder_1: 0           # protect formatting
noise_levels:
{levels}
placeholder_2: 0           # protect formatting
smoothing: {smoothing}
causal_kernel: 0
windowsize: 64
before_frac: 0.5
ensemble_size: 2
training_finished: Yes
"""


# --------------------------------------------------------------------------- #
# Helpers and fixtures
# --------------------------------------------------------------------------- #


def make_model(
    folder: Path,
    name: str = MODEL,
    rate: float = 2.0,
    smoothing: float = 0.5,
    noise_levels=(2, 3),
    ensembles: int = 2,
    marker: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    levels = "\n".join(f"- {n}" for n in noise_levels)
    (folder / "config.yaml").write_text(
        CONFIG_TEMPLATE.format(name=name, rate=rate, smoothing=smoothing, levels=levels)
    )
    for level in noise_levels:
        for ens in range(ensembles):
            with h5py.File(folder / f"Model_NoiseLevel_{level}_Ensemble_{ens}.h5", "w") as f:
                f["weights"] = np.full(16, level + ens, dtype=np.float32)
    if marker is not None:
        (folder / "marker.txt").write_text(marker)
    return folder


def zip_model(folder: Path, zip_path: Path, subfolder: str | None = None) -> bytes:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            arcname = f"{subfolder}/{path.name}" if subfolder else path.name
            archive.write(path, arcname)
    return zip_path.read_bytes()


def index_yaml(links: dict) -> bytes:
    lines = ["###", "### Download links for available models", "###", ""]
    for name, link in links.items():
        lines += [f"{name}:", f"    Link: {link}", "    Info:"]
    return ("\n".join(lines) + "\n").encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """Tiny threaded HTTP server: routes[path] = bytes | int (status) | callable."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list = []
        self.truncate: set = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                route = server.routes.get(self.path, 404)
                if callable(route):
                    route = route()
                if isinstance(route, int):
                    self.send_error(route)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(route)))
                self.end_headers()
                if self.path in server.truncate:
                    self.wfile.write(route[: len(route) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(route)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def builtin_dir(tmp_path):
    return make_model(tmp_path / "models" / "builtin_2Hz_smoothing500ms", name="builtin_2Hz_smoothing500ms")


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def served_model(tmp_path, server):
    """MODEL zipped (files at top level) and an index pointing to it."""
    zip_bytes = zip_model(make_model(tmp_path / "src" / MODEL, marker="served"), tmp_path / "m.zip")
    server.routes["/m.zip"] = zip_bytes
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/m.zip")})
    return server


def refused_url(path: str = "/x") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


def cache_listing(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir())


def resolve(name, cache, builtin_dir, index_url, known=None, **kw):
    return resolve_model(
        name,
        None,
        cache,
        builtin_dir,
        index_url=index_url,
        known_models=known if known is not None else {},
        timeout_s=TIMEOUT,
        **kw,
    )


# --------------------------------------------------------------------------- #
# Names, index, auto choice
# --------------------------------------------------------------------------- #


def test_parse_model_sampling_rate_and_smoothing():
    assert parse_model_sampling_rate_hz("Global_EXC_2.5Hz_smoothing400ms_high_noise") == 2.5
    assert parse_model_sampling_rate_hz("Global_EXC_2Hz_smoothing500ms") == 2.0
    assert parse_model_sampling_rate_hz("OGB_zf_pDp_7.5Hz_smoothing200ms") == 7.5
    assert parse_model_sampling_rate_hz("builtin_2Hz_smoothing500ms") == 2.0
    assert parse_model_smoothing_ms("Global_EXC_4.25Hz_smoothing300ms_causalkernel") == 300.0
    with pytest.raises(ValueError):
        parse_model_sampling_rate_hz("my_model")


def test_parse_model_index():
    text = index_yaml({"A_2Hz_smoothing500ms": "http://h/a", "B": "http://h/b"}) + b"C:\n    Info: x\n"
    assert parse_model_index(text) == {"A_2Hz_smoothing500ms": "http://h/a", "B": "http://h/b"}
    with pytest.raises(ValueError):
        parse_model_index("- just\n- a list\n")


@pytest.mark.skipif(not (SHARED_MODELS / "available_models.yaml").is_file(), reason="no CASCADE index copy")
def test_embedded_table_matches_official_index():
    official = parse_model_index((SHARED_MODELS / "available_models.yaml").read_bytes())
    global_exc = {k: v for k, v in official.items() if k.startswith("Global_EXC_")}
    assert dict(OFFICIAL_GLOBAL_EXC_MODELS) == global_exc
    assert OFFICIAL_MODEL_INDEX_URL.startswith("https://drive.switch.ch/")


@pytest.mark.parametrize(
    "rate, expected",
    [
        (1.84, "Global_EXC_2Hz_smoothing500ms"),
        (2.0, "Global_EXC_2Hz_smoothing500ms"),
        (2.25, "Global_EXC_2Hz_smoothing500ms"),  # tie 2 vs 2.5 Hz: plain variant wins
        (2.56, "Global_EXC_2.5Hz_smoothing400ms_high_noise"),
        (7.4, "Global_EXC_7.5Hz_smoothing200ms"),
        (1.0, "Global_EXC_1Hz_smoothing1000ms"),
        (10.0, "Global_EXC_10Hz_smoothing100ms"),
    ],
)
def test_choose_auto_model_name(rate, expected):
    names = list(OFFICIAL_GLOBAL_EXC_MODELS) + ["Zebrafish_1Hz_smoothing1000ms", "OGB_zf_pDp_7.5Hz_smoothing200ms"]
    assert choose_auto_model_name(rate, names) == expected
    random.Random(0).shuffle(names)
    assert choose_auto_model_name(rate, names) == expected


def test_choose_auto_model_name_rejects_bad_input():
    with pytest.raises(ValueError):
        choose_auto_model_name(0.0, OFFICIAL_GLOBAL_EXC_MODELS)
    with pytest.raises(ValueError):
        choose_auto_model_name(float("nan"), OFFICIAL_GLOBAL_EXC_MODELS)
    with pytest.raises(ValueError):
        choose_auto_model_name(2.0, ["Zebrafish_1Hz_smoothing1000ms"])


# --------------------------------------------------------------------------- #
# Folder completeness
# --------------------------------------------------------------------------- #


def test_is_complete_model_folder(tmp_path):
    good = make_model(tmp_path / "good")
    assert is_complete_model_folder(good)
    assert not is_complete_model_folder(tmp_path / "missing")

    no_level = make_model(tmp_path / "no_level")
    for path in no_level.glob("Model_NoiseLevel_3_*.h5"):
        path.unlink()
    assert "Model_NoiseLevel_3" in model_folder_problem(no_level)

    empty = make_model(tmp_path / "empty")
    (empty / "Model_NoiseLevel_2_Ensemble_0.h5").write_bytes(b"")
    assert "empty" in model_folder_problem(empty)

    not_h5 = make_model(tmp_path / "not_h5")
    (not_h5 / "Model_NoiseLevel_2_Ensemble_1.h5").write_bytes(b"<html>error</html>")
    assert "not an HDF5" in model_folder_problem(not_h5)

    truncated = make_model(tmp_path / "truncated")
    h5 = truncated / "Model_NoiseLevel_3_Ensemble_1.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    assert "truncated" in model_folder_problem(truncated)

    bad_config = make_model(tmp_path / "bad_config")
    (bad_config / "config.yaml").write_text("sampling_rate: 2\n")
    assert "noise_levels" in model_folder_problem(bad_config)
    (bad_config / "config.yaml").write_text("noise_levels: [2, 3]\n")
    assert "sampling_rate" in model_folder_problem(bad_config)
    (bad_config / "config.yaml").unlink()
    assert model_folder_problem(bad_config) == "no config.yaml"


def test_hdf5_latest_superblock_checked(tmp_path):
    folder = make_model(tmp_path / "m", noise_levels=(2,), ensembles=1)
    h5 = folder / "Model_NoiseLevel_2_Ensemble_0.h5"
    with h5py.File(h5, "w", libver="latest") as f:
        f["weights"] = np.zeros(64)
    assert is_complete_model_folder(folder)
    h5.write_bytes(h5.read_bytes()[:-100])
    assert not is_complete_model_folder(folder)


@pytest.mark.skipif(not (SHARED_MODELS / "OGB_zf_pDp_7.5Hz_smoothing200ms").is_dir(), reason="no official model")
def test_official_model_folder_is_complete():
    assert is_complete_model_folder(SHARED_MODELS / "OGB_zf_pDp_7.5Hz_smoothing200ms")


# --------------------------------------------------------------------------- #
# resolve_model
# --------------------------------------------------------------------------- #


def test_model_dir(tmp_path, builtin_dir):
    folder = make_model(tmp_path / "my_model", rate=7.5, smoothing=0.2)
    choice = resolve_model(MODEL, folder, tmp_path / "unused_cache", builtin_dir, strict=True, index_url=refused_url())
    assert choice == ModelChoice(
        name="my_model",
        folder=folder.resolve(),
        source="model_dir",
        sampling_rate_hz=7.5,
        smoothing_s=0.2,
        requested=str(folder),
    )
    assert not (tmp_path / "unused_cache").exists()
    attrs = choice.as_attrs()
    assert attrs["model_source"] == "model_dir" and attrs["model_sampling_rate_hz"] == 7.5
    assert attrs["model_folder"] == str(folder.resolve()) and attrs["model_smoothing_s"] == 0.2


def test_model_dir_with_model_in_one_subfolder(tmp_path, builtin_dir):
    inner = make_model(tmp_path / "unzipped" / MODEL)
    choice = resolve_model(None, tmp_path / "unzipped", None, builtin_dir)
    assert choice.folder == inner.resolve() and choice.name == MODEL


@pytest.mark.parametrize("strict", [False, True])
def test_model_dir_invalid_is_clear_error(tmp_path, builtin_dir, strict):
    broken = make_model(tmp_path / "broken")
    (broken / "Model_NoiseLevel_2_Ensemble_0.h5").unlink()
    (broken / "Model_NoiseLevel_2_Ensemble_1.h5").unlink()
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(None, broken, None, builtin_dir, strict=strict)
    message = str(info.value)
    assert str(broken) in message and "--model_dir" in message and "Model_NoiseLevel_2" in message
    assert "\n" not in message
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(None, tmp_path / "nope", None, builtin_dir, strict=strict)


def test_builtin_explicit_and_default(builtin_dir, cache):
    for name in ("builtin", "BUILTIN", None):
        choice = resolve(name, cache, builtin_dir, refused_url(), strict=True)
        assert choice.source == "builtin" and choice.name == "builtin_2Hz_smoothing500ms"
        assert choice.sampling_rate_hz == 2.0 and choice.smoothing_s == 0.5 and not choice.is_fallback
    assert cache_listing(cache) == []


def test_builtin_missing_is_error(tmp_path, cache):
    with pytest.raises(ModelResolutionError, match="builtin"):
        resolve("builtin", cache, tmp_path / "no_builtin", refused_url())


def test_cache_hit_touches_no_network(cache, builtin_dir, served_model):
    make_model(cache / MODEL, marker="cached")
    choice = resolve(
        MODEL,
        cache,
        builtin_dir,
        served_model.url("/index.yaml"),
        known={MODEL: served_model.url("/m.zip")},
        strict=True,
    )
    assert choice.source == "cache" and choice.folder == (cache / MODEL).resolve()
    assert (choice.folder / "marker.txt").read_text() == "cached"
    assert served_model.requests == []


def test_cache_hit_nested_layout(cache, builtin_dir):
    inner = make_model(cache / MODEL / MODEL)  # e.g. a zip with a sub-folder unpacked into <cache>/<name>
    choice = resolve(MODEL, cache, builtin_dir, refused_url(), strict=True)
    assert choice.source == "cache" and choice.folder == inner.resolve() and choice.name == MODEL


def test_download_populates_cache_atomically(cache, builtin_dir, served_model):
    choice = resolve(MODEL, cache, builtin_dir, served_model.url("/index.yaml"), strict=True)
    assert choice.source == "downloaded" and choice.name == MODEL
    assert choice.folder == (cache / MODEL).resolve() and is_complete_model_folder(choice.folder)
    assert (choice.folder / "marker.txt").read_text() == "served"
    assert served_model.requests == ["/index.yaml", "/m.zip"]
    assert cache_listing(cache) == [MODEL]  # no temporaries left behind
    # second resolution is a cache hit, no network
    again = resolve(MODEL, cache, builtin_dir, served_model.url("/index.yaml"), strict=True)
    assert again.source == "cache" and len(served_model.requests) == 2


def test_download_zip_with_subfolder(tmp_path, cache, builtin_dir, server):
    src = make_model(tmp_path / "src" / MODEL)
    server.routes["/nested.zip"] = zip_model(src, tmp_path / "nested.zip", subfolder=MODEL)
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/nested.zip")})
    choice = resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"), strict=True)
    assert choice.source == "downloaded" and choice.folder == (cache / MODEL).resolve()
    assert (cache / MODEL / "config.yaml").is_file()
    assert cache_listing(cache) == [MODEL]


def test_index_unavailable_uses_embedded_link(cache, builtin_dir, served_model):
    choice = resolve(MODEL, cache, builtin_dir, refused_url(), known={MODEL: served_model.url("/m.zip")}, strict=True)
    assert choice.source == "downloaded" and served_model.requests == ["/m.zip"]


def test_download_404_falls_back_to_builtin(cache, builtin_dir, server, caplog):
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/missing.zip")})
    with caplog.at_level(logging.WARNING):
        choice = resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"), frame_rate_hz=2.0)
    assert choice.source.startswith(FALLBACK_SOURCE_PREFIX) and choice.is_fallback
    assert "404" in choice.source and MODEL in choice.source
    assert choice.name == "builtin_2Hz_smoothing500ms" and choice.requested == MODEL
    assert choice.as_attrs()["model_source"] == choice.source
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(MODEL in r.getMessage() and "builtin" in r.getMessage() for r in warnings)
    assert cache_listing(cache) == []


def test_connection_refused_falls_back_to_builtin(cache, builtin_dir, caplog):
    with caplog.at_level(logging.WARNING):
        choice = resolve(MODEL, cache, builtin_dir, refused_url("/index.yaml"), known={MODEL: refused_url("/m.zip")})
    assert choice.source.startswith("builtin (fallback:") and choice.source.endswith(")")
    assert any(r.levelno == logging.WARNING and "falling back" in r.getMessage() for r in caplog.records)
    assert cache_listing(cache) == []


def test_unknown_model_falls_back(cache, builtin_dir, served_model):
    choice = resolve("Global_EXC_99Hz_smoothing1ms", cache, builtin_dir, served_model.url("/index.yaml"))
    assert choice.is_fallback and "no download link" in choice.source


def test_downloads_disabled_falls_back(cache, builtin_dir, served_model):
    choice = resolve(MODEL, cache, builtin_dir, served_model.url("/index.yaml"), allow_download=False)
    assert choice.is_fallback and "downloads are disabled" in choice.source
    assert served_model.requests == []


def test_strict_download_failure_is_actionable_error(cache, builtin_dir, server):
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/missing.zip")})
    with pytest.raises(ModelResolutionError) as info:
        resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"), strict=True)
    message = str(info.value)
    assert MODEL in message and "--strict_model" in message and str(cache / MODEL) in message
    assert "--model_dir" in message and "\n" not in message


def test_invalid_model_name_is_error(cache, builtin_dir):
    with pytest.raises(ModelResolutionError, match="invalid CASCADE model name"):
        resolve("../etc", cache, builtin_dir, refused_url())


def test_auto_picks_model_by_frame_rate(cache, builtin_dir, server):
    names = [
        "Global_EXC_2Hz_smoothing500ms",
        "Global_EXC_2.5Hz_smoothing400ms_high_noise",
        "Global_EXC_7.5Hz_smoothing200ms",
    ]
    for name in names:
        make_model(
            cache / name,
            name=name,
            rate=parse_model_sampling_rate_hz(name),
            smoothing=parse_model_smoothing_ms(name) / 1000,
        )
    known = {name: server.url(f"/{name}.zip") for name in OFFICIAL_GLOBAL_EXC_MODELS}
    for rate, expected in [(1.84, names[0]), (2.56, names[1]), (7.4, names[2])]:
        choice = resolve(
            AUTO_MODEL_KEYWORD,
            cache,
            builtin_dir,
            server.url("/index.yaml"),
            known=known,
            strict=True,
            frame_rate_hz=rate,
        )
        assert (choice.name, choice.source, choice.requested) == (expected, "cache", "auto")
        assert choice.sampling_rate_hz == parse_model_sampling_rate_hz(expected)
    assert server.requests == []
    with pytest.raises(ModelResolutionError, match="frame rate"):
        resolve("auto", cache, builtin_dir, refused_url(), known=known)


def test_auto_downloads_when_not_cached(tmp_path, cache, builtin_dir, server):
    name = "Global_EXC_7.5Hz_smoothing200ms"
    src = make_model(tmp_path / "src" / name, name=name, rate=7.5, smoothing=0.2)
    server.routes["/m75.zip"] = zip_model(src, tmp_path / "m75.zip")
    server.routes["/index.yaml"] = index_yaml({name: server.url("/m75.zip")})
    choice = resolve(
        "auto",
        cache,
        builtin_dir,
        server.url("/index.yaml"),
        known=OFFICIAL_GLOBAL_EXC_MODELS,
        frame_rate_hz=7.4,
        strict=True,
    )
    assert choice.name == name and choice.source == "downloaded"


def test_corrupt_cache_entry_is_redownloaded(cache, builtin_dir, served_model, caplog):
    stale = make_model(cache / MODEL, marker="stale")
    h5 = stale / "Model_NoiseLevel_2_Ensemble_0.h5"
    h5.write_bytes(h5.read_bytes()[:100])  # truncated copy
    with caplog.at_level(logging.WARNING):
        choice = resolve(MODEL, cache, builtin_dir, served_model.url("/index.yaml"), strict=True)
    assert choice.source == "downloaded" and is_complete_model_folder(cache / MODEL)
    assert (cache / MODEL / "marker.txt").read_text() == "served"
    assert any("incomplete" in r.getMessage() for r in caplog.records)
    assert cache_listing(cache) == [MODEL]


def test_partial_cache_entry_is_redownloaded(cache, builtin_dir, served_model):
    (cache / MODEL).mkdir()
    (cache / MODEL / "config.yaml").write_text("model_name: x\n")  # interrupted copy
    choice = resolve(MODEL, cache, builtin_dir, served_model.url("/index.yaml"), strict=True)
    assert choice.source == "downloaded" and cache_listing(cache) == [MODEL]


def test_corrupt_cache_entry_and_failed_download_names_folder(cache, builtin_dir, server):
    (cache / MODEL).mkdir()
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/missing.zip")})
    with pytest.raises(ModelResolutionError) as info:
        resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"), strict=True)
    assert f"cache entry {cache / MODEL} is incomplete" in str(info.value)
    choice = resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"))
    assert choice.is_fallback and str(cache / MODEL) in choice.source
    assert (cache / MODEL).is_dir()  # left as it was when nothing better was obtained


@pytest.mark.parametrize("mode", ["connection_cut", "truncated_file", "html_page", "bad_crc"])
def test_broken_download_never_installs(tmp_path, cache, builtin_dir, server, mode):
    zip_bytes = zip_model(make_model(tmp_path / "src" / MODEL), tmp_path / "m.zip")
    if mode == "connection_cut":  # Content-Length announced, half the body sent
        server.routes["/m.zip"] = zip_bytes
        server.truncate.add("/m.zip")
    elif mode == "truncated_file":  # a truncated zip served completely
        server.routes["/m.zip"] = zip_bytes[: len(zip_bytes) * 2 // 3]
    elif mode == "html_page":
        server.routes["/m.zip"] = b"<html><body>Too many requests</body></html>"
    else:  # flip one byte in the compressed data of the first member
        corrupt = bytearray(zip_bytes)
        corrupt[200] ^= 0xFF
        server.routes["/m.zip"] = bytes(corrupt)
    server.routes["/index.yaml"] = index_yaml({MODEL: server.url("/m.zip")})
    with pytest.raises(ModelDownloadError):
        download_model(MODEL, cache, index_url=server.url("/index.yaml"), timeout_s=TIMEOUT, known_models={})
    assert cache_listing(cache) == []
    choice = resolve(MODEL, cache, builtin_dir, server.url("/index.yaml"))
    assert choice.is_fallback and not (cache / MODEL).exists() and cache_listing(cache) == []


def test_zip_without_model_is_rejected(tmp_path, cache, server):
    folder = make_model(tmp_path / "src" / MODEL)
    (folder / "config.yaml").unlink()
    server.routes["/m.zip"] = zip_model(folder, tmp_path / "m.zip")
    with pytest.raises(ModelDownloadError, match="no complete CASCADE model"):
        download_model(MODEL, cache, index_url=None, known_models={MODEL: server.url("/m.zip")}, timeout_s=TIMEOUT)
    assert cache_listing(cache) == []


def test_zip_with_unsafe_path_is_rejected(tmp_path, cache, server):
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("../evil.txt", "x")
    server.routes["/evil.zip"] = zip_path.read_bytes()
    with pytest.raises(ModelDownloadError, match="unsafe path"):
        download_model(MODEL, cache, index_url=None, known_models={MODEL: server.url("/evil.zip")}, timeout_s=TIMEOUT)
    assert not (tmp_path / "evil.txt").exists() and cache_listing(cache) == []


def test_concurrent_winner_is_kept(tmp_path, cache, served_model):
    """Another process (e.g. a SLURM array task) installs the model while we download."""
    zip_bytes = served_model.routes["/m.zip"]

    def winner_installs_then_serves():
        make_model(cache / MODEL, marker="winner")
        return zip_bytes

    served_model.routes["/m.zip"] = winner_installs_then_serves
    folder = download_model(MODEL, cache, index_url=served_model.url("/index.yaml"), timeout_s=TIMEOUT, known_models={})
    assert folder == cache / MODEL and (folder / "marker.txt").read_text() == "winner"
    assert cache_listing(cache) == [MODEL]


def test_stale_temporaries_are_cleaned(cache, served_model):
    old = cache / f".{MODEL}.deadbeef.zip.tmp"
    old.write_bytes(b"partial")
    os.utime(old, (1, 1))
    fresh = cache / f".{MODEL}.cafe.extract.tmp"
    fresh.mkdir()  # may belong to a running process: kept
    download_model(MODEL, cache, index_url=served_model.url("/index.yaml"), timeout_s=TIMEOUT, known_models={})
    assert cache_listing(cache) == sorted([MODEL, fresh.name])


def test_find_model_folder_rejects_ambiguous_layout(tmp_path):
    make_model(tmp_path / "two" / "a")
    make_model(tmp_path / "two" / "b")
    assert find_model_folder(tmp_path / "two") is None


def test_rate_mismatch_warning(tmp_path, builtin_dir, caplog):
    folder = make_model(tmp_path / "m30", rate=30.0, smoothing=0.05)
    with caplog.at_level(logging.WARNING):
        resolve_model(None, folder, None, builtin_dir, frame_rate_hz=2.0)
    assert any("frame rate is 2 Hz" in r.getMessage() for r in caplog.records)
