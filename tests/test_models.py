"""Tests of the CASCADE models section: loading and checking a folder, provenance and digest,
resolution (--model_dir, builtin family, auto, cache, download, builtin fallback, strict, offline).

No real network: downloads are served by a local HTTP server on 127.0.0.1, and "refused" URLs
point to a port that was just released. Model folders are real (weights copied from the shipped
builtin model) because loading a folder is what checks it.
"""

from __future__ import annotations

import http.server
import logging
import os
import random
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import shared_dir

import unified_spike_processing_coo as usp
from unified_spike_processing_coo import (
    FALLBACK_SOURCE_PREFIX,
    ModelDownloadError,
    ModelResolutionError,
    PipelineError,
    choose_auto_model_name,
    download_model,
    official_models,
    parse_model_sampling_rate_hz,
    read_model_folder,
    resolve_model,
)

SHARED_MODELS = shared_dir() / "cascade" / "Pretrained_models"
REAL_BUILTIN = usp.REPO_DIR / "models" / "builtin_2Hz_smoothing500ms"
MODEL = "Global_EXC_2Hz_smoothing500ms"
# The packaged table (tests replace the search folders, so read it here once).
OFFICIAL_NAMES = list(yaml.safe_load((usp.REPO_DIR / "models" / "official_models.yaml").read_text()))
TIMEOUT = 5.0


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
    """A small, loadable CASCADE model folder: the builtin's weights under a config of our choice."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REAL_BUILTIN / "config.yaml").read_text())
    keys = ("windowsize", "before_frac", "filter_sizes", "filter_numbers", "dense_expansion", "causal_kernel")
    config = {key: config[key] for key in keys}
    config.update(model_name=name, sampling_rate=rate, smoothing=smoothing, noise_levels=list(noise_levels))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    for level in noise_levels:
        for ens in range(ensembles):
            shutil.copyfile(
                REAL_BUILTIN / f"Model_NoiseLevel_{level}_Ensemble_{ens % 2}.h5",
                folder / f"Model_NoiseLevel_{level}_Ensemble_{ens}.h5",
            )
    if marker is not None:
        (folder / "marker.txt").write_text(marker)
    return folder


def zip_model(folder: Path, zip_path: Path, subfolder: str | None = None) -> bytes:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{subfolder}/{path.name}" if subfolder else path.name)
    return zip_path.read_bytes()


def index_yaml(links: dict) -> str:
    """An index in CASCADE's available_models.yaml shape."""
    lines = ["###", "### Download links for available models", "###", ""]
    for name, link in links.items():
        lines += [f"{name}:", f"    Link: {link}", "    Info:"]
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused_url(path: str = "/x") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


def cache_listing(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir())


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
def _isolated(monkeypatch):
    """No proxy, and a fresh per-process cache: each test resolves as a new process would."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(usp, "PROCESS_CACHE", {})


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A models/ folder holding one builtin model (2 Hz) and no official table until a test writes one."""
    folder = tmp_path / "models"
    make_model(folder / "builtin_2Hz_smoothing500ms", name="builtin_2Hz_smoothing500ms")
    monkeypatch.setattr(usp, "MODEL_SEARCH_DIRS", (folder,))
    return folder


def set_official(models_dir: Path, links: dict) -> None:
    (models_dir / "official_models.yaml").write_text(index_yaml(links))


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def served_model(tmp_path, server, models_dir):
    """MODEL zipped (files at the top level), and the official table pointing to it."""
    server.routes["/m.zip"] = zip_model(make_model(tmp_path / "src" / MODEL, marker="served"), tmp_path / "m.zip")
    set_official(models_dir, {MODEL: server.url("/m.zip")})
    return server


def resolve(name, cache, **kw):
    return resolve_model(name, cache_dir=cache, **kw)


def warnings_in(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- #
# Names, official table, auto choice
# --------------------------------------------------------------------------- #


def test_parse_model_sampling_rate():
    assert parse_model_sampling_rate_hz("Global_EXC_2.5Hz_smoothing400ms_high_noise") == 2.5
    assert parse_model_sampling_rate_hz("Global_EXC_2Hz_smoothing500ms") == 2.0
    assert parse_model_sampling_rate_hz("OGB_zf_pDp_7.5Hz_smoothing200ms") == 7.5
    assert parse_model_sampling_rate_hz("builtin_1.85Hz_smoothing500ms") == 1.85
    with pytest.raises(ValueError):
        parse_model_sampling_rate_hz("my_model")


def test_official_models_reads_table_and_cache_index(models_dir, cache, caplog):
    set_official(models_dir, {"A_2Hz_smoothing500ms": "http://h/a", "B": "http://h/b"})
    (models_dir / "official_models.yaml").write_text(
        (models_dir / "official_models.yaml").read_text() + "C:\n    Info: no link\n"
    )
    assert official_models(cache) == {"A_2Hz_smoothing500ms": "http://h/a", "B": "http://h/b"}
    # neuralib's newer copy of the index in the cache adds names and wins
    (cache / "available_models.yaml").write_text(index_yaml({"B": "http://new/b", "D": "http://h/d"}))
    assert official_models(cache) == {"A_2Hz_smoothing500ms": "http://h/a", "B": "http://new/b", "D": "http://h/d"}
    # an index that is not a mapping is ignored with a warning
    (cache / "available_models.yaml").write_text("- just\n- a list\n")
    with caplog.at_level(logging.WARNING):
        assert official_models(cache) == {"A_2Hz_smoothing500ms": "http://h/a", "B": "http://h/b"}
    assert any("available_models.yaml" in m for m in warnings_in(caplog))


@pytest.mark.skipif(not (SHARED_MODELS / "available_models.yaml").is_file(), reason="no CASCADE index copy")
def test_packaged_table_matches_official_index(tmp_path):
    official = yaml.safe_load((SHARED_MODELS / "available_models.yaml").read_text())
    packaged = official_models(tmp_path / "empty_cache")
    assert packaged == {name: entry["Link"] for name, entry in official.items()}
    assert all(link.startswith("https://drive.switch.ch/") for link in packaged.values())
    assert len([name for name in packaged if name.startswith("Global_EXC_")]) >= 70


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
    names = list(OFFICIAL_NAMES)  # the packaged table, with Zebrafish_*, OGB_* etc. beside Global_EXC_*
    assert "Zebrafish_1Hz_smoothing1000ms" in names and "OGB_zf_pDp_7.5Hz_smoothing200ms" in names
    assert choose_auto_model_name(rate, names) == expected
    random.Random(0).shuffle(names)
    assert choose_auto_model_name(rate, names) == expected


def test_choose_auto_model_name_rejects_bad_input():
    with pytest.raises(ValueError):
        choose_auto_model_name(0.0, OFFICIAL_NAMES)
    with pytest.raises(ValueError):
        choose_auto_model_name(float("nan"), OFFICIAL_NAMES)
    with pytest.raises(ValueError):
        choose_auto_model_name(2.0, ["Zebrafish_1Hz_smoothing1000ms"])


# --------------------------------------------------------------------------- #
# Loading checks the folder; provenance and digest
# --------------------------------------------------------------------------- #


def test_loader_names_what_is_wrong(tmp_path):
    assert read_model_folder(make_model(tmp_path / "good")).noise_levels == (2, 3)
    with pytest.raises(PipelineError, match="does not exist"):
        read_model_folder(tmp_path / "missing")

    no_level = make_model(tmp_path / "no_level")
    for path in no_level.glob("Model_NoiseLevel_3_*.h5"):
        path.unlink()
    with pytest.raises(PipelineError, match="Model_NoiseLevel_3"):
        read_model_folder(no_level)

    for case, content in [("empty", b""), ("not_h5", b"<html>error</html>")]:
        folder = make_model(tmp_path / case)
        (folder / "Model_NoiseLevel_2_Ensemble_1.h5").write_bytes(content)
        with pytest.raises(PipelineError, match="Model_NoiseLevel_2_Ensemble_1.h5") as info:
            read_model_folder(folder)
        assert "re-download" in str(info.value)

    truncated = make_model(tmp_path / "truncated")
    h5 = truncated / "Model_NoiseLevel_3_Ensemble_1.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    with pytest.raises(PipelineError, match="Model_NoiseLevel_3_Ensemble_1.h5.*truncated"):
        read_model_folder(truncated)

    bad_config = make_model(tmp_path / "bad_config")
    config = yaml.safe_load((bad_config / "config.yaml").read_text())
    for key in ("noise_levels", "sampling_rate"):
        (bad_config / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if k != key}))
        with pytest.raises(PipelineError, match=f"config.yaml lacks '{key}'"):
            read_model_folder(bad_config)
    for broken in ("noise_levels: [2, 3\n", "just text\n", yaml.safe_dump(dict(config, sampling_rate=0))):
        (bad_config / "config.yaml").write_text(broken)
        with pytest.raises(PipelineError, match="config.yaml"):
            read_model_folder(bad_config)
    (bad_config / "config.yaml").unlink()
    with pytest.raises(PipelineError, match="has no config.yaml"):
        read_model_folder(bad_config)


def test_truncated_latest_format_file_is_caught(tmp_path):
    """A weight file in HDF5's newest format, cut short, is refused too."""
    folder = make_model(tmp_path / "m", noise_levels=(2,), ensembles=1)
    h5 = folder / "Model_NoiseLevel_2_Ensemble_0.h5"
    original = tmp_path / "original.h5"
    shutil.move(h5, original)
    with h5py.File(original, "r") as src, h5py.File(h5, "w", libver="latest") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for key in src:
            src.copy(src[key], dst)
    assert read_model_folder(folder).ensemble_size == 1
    h5.write_bytes(h5.read_bytes()[:-100])
    with pytest.raises(PipelineError, match="Model_NoiseLevel_2_Ensemble_0.h5"):
        read_model_folder(folder)


@pytest.mark.skipif(not (SHARED_MODELS / "OGB_zf_pDp_7.5Hz_smoothing200ms").is_dir(), reason="no official model")
def test_official_model_folder_loads():
    model = read_model_folder(SHARED_MODELS / "OGB_zf_pDp_7.5Hz_smoothing200ms")
    assert model.ensemble_size == 5 and len(model.digest) == 16


def test_digest_is_stable_and_follows_the_weights(tmp_path):
    first = read_model_folder(make_model(tmp_path / "a"))
    assert len(first.digest) == 16 and set(first.digest) <= set("0123456789abcdef")  # 16 hex digits
    copy = shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert read_model_folder(copy).digest == first.digest  # same bytes, another folder
    assert read_model_folder(tmp_path / "a").digest == first.digest
    # another weight file (still a valid model) changes it
    shutil.copyfile(copy / "Model_NoiseLevel_2_Ensemble_1.h5", copy / "Model_NoiseLevel_2_Ensemble_0.h5")
    changed = read_model_folder(copy)
    assert changed.digest != first.digest
    # so does config.yaml
    (tmp_path / "a" / "config.yaml").write_text((tmp_path / "a" / "config.yaml").read_text() + "# note\n")
    assert read_model_folder(tmp_path / "a").digest not in (first.digest, changed.digest)


def test_provenance_records_how_the_model_was_made(tmp_path):
    folder = make_model(tmp_path / "m", name="my_model", rate=7.5, smoothing=0.2)
    model = read_model_folder(folder, source="cache", requested="my_model")
    assert model.provenance() == {
        "cascade_model": "my_model",
        "model_source": "cache",
        "model_requested": "my_model",
        "model_folder": str(folder.resolve()),
        "model_sampling_rate_hz": 7.5,
        "model_smoothing_s": 0.2,
        "model_noise_levels": [2, 3],
        "model_ensemble_size": 2,
        "model_digest": model.digest,
    }
    assert not model.is_fallback


# --------------------------------------------------------------------------- #
# --model_dir
# --------------------------------------------------------------------------- #


def test_model_dir(tmp_path, models_dir):
    folder = make_model(tmp_path / "my_model", name="my_model", rate=7.5, smoothing=0.2)
    model = resolve_model(MODEL, model_dir=folder, cache_dir=tmp_path / "unused_cache", strict=True)
    assert (model.name, model.folder, model.source, model.requested) == (
        "my_model",
        str(folder.resolve()),
        "model_dir",
        str(folder),
    )
    assert (model.sampling_rate_hz, model.smoothing_s) == (7.5, 0.2)
    assert not (tmp_path / "unused_cache").exists()
    attrs = model.provenance()
    assert attrs["model_source"] == "model_dir" and attrs["model_sampling_rate_hz"] == 7.5
    assert attrs["model_folder"] == str(folder.resolve()) and attrs["model_smoothing_s"] == 0.2


def test_model_dir_with_model_in_one_subfolder(tmp_path, models_dir):
    inner = make_model(tmp_path / "unzipped" / MODEL)
    model = resolve_model(model_dir=tmp_path / "unzipped")
    assert model.folder == str(inner.resolve()) and model.name == MODEL


@pytest.mark.parametrize("strict", [False, True])
def test_model_dir_invalid_is_clear_error(tmp_path, models_dir, strict):
    broken = make_model(tmp_path / "broken")
    for path in broken.glob("Model_NoiseLevel_2_*.h5"):
        path.unlink()
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(model_dir=broken, strict=strict)
    message = str(info.value)
    assert str(broken) in message and "--model_dir" in message and "Model_NoiseLevel_2" in message
    assert "\n" not in message
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(model_dir=tmp_path / "nope", strict=strict)


def test_model_dir_with_two_models_is_an_error(tmp_path, models_dir):
    make_model(tmp_path / "two" / "a")
    make_model(tmp_path / "two" / "b")
    with pytest.raises(ModelResolutionError, match="no config.yaml"):
        resolve_model(model_dir=tmp_path / "two")


# --------------------------------------------------------------------------- #
# builtin: a family, the nearest rate wins
# --------------------------------------------------------------------------- #


def test_builtin_explicit_and_default(models_dir, cache):
    for name in ("builtin", "BUILTIN", None):
        model = resolve(name, cache, strict=True)
        assert model.source == "builtin" and model.name == "builtin_2Hz_smoothing500ms"
        assert model.sampling_rate_hz == 2.0 and model.smoothing_s == 0.5 and not model.is_fallback
    assert resolve_model().name == "builtin_2Hz_smoothing500ms"
    assert cache_listing(cache) == []


def test_builtin_missing_is_error(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(usp, "MODEL_SEARCH_DIRS", (tmp_path / "no_models",))
    with pytest.raises(ModelResolutionError, match="builtin"):
        resolve("builtin", cache)


def test_builtin_broken_is_error(models_dir, cache):
    (models_dir / "builtin_2Hz_smoothing500ms" / "config.yaml").unlink()
    with pytest.raises(ModelResolutionError, match="builtin.*config.yaml"):
        resolve("builtin", cache)


@pytest.fixture
def family(models_dir):
    """Builtin models at 1.85, 2, 2.2, 2.4 and 2.6 Hz (copies of the 2 Hz one, rate edited)."""
    for rate in (1.85, 2.2, 2.4, 2.6):
        folder = shutil.copytree(
            models_dir / "builtin_2Hz_smoothing500ms", models_dir / f"builtin_{rate}Hz_smoothing500ms"
        )
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config.update(sampling_rate=rate, model_name=folder.name)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return models_dir


@pytest.mark.parametrize(
    "frame_rate_hz, expected_hz",
    [(None, 2.0), (1.5, 1.85), (1.9, 1.85), (2.05, 2.0), (2.1, 2.0), (2.25, 2.2), (2.45, 2.4), (3.0, 2.6)],
)
def test_builtin_family_nearest_rate(family, cache, frame_rate_hz, expected_hz):
    """2.1 Hz lies halfway between 2 and 2.2 Hz: the lower rate wins."""
    model = resolve("builtin", cache, frame_rate_hz=frame_rate_hz)
    assert model.sampling_rate_hz == expected_hz and model.source == "builtin"
    assert model.name == f"builtin_{expected_hz:g}Hz_smoothing500ms"
    assert resolve_model("builtin", frame_rate_hz=frame_rate_hz).sampling_rate_hz == expected_hz


def test_builtin_family_listing_and_search_order(family, tmp_path, monkeypatch):
    assert list(usp.builtin_models()) == [
        "builtin_1.85Hz_smoothing500ms",
        "builtin_2Hz_smoothing500ms",
        "builtin_2.2Hz_smoothing500ms",
        "builtin_2.4Hz_smoothing500ms",
        "builtin_2.6Hz_smoothing500ms",
    ]
    # a second search folder (the pip-installed share/) adds models; the first folder wins a name
    share = tmp_path / "share_models"
    make_model(share / "builtin_2Hz_smoothing500ms", name="shadowed")
    make_model(share / "builtin_5Hz_smoothing200ms", name="builtin_5Hz_smoothing200ms", rate=5.0, smoothing=0.2)
    monkeypatch.setattr(usp, "MODEL_SEARCH_DIRS", (family, share))
    assert usp.builtin_models()["builtin_2Hz_smoothing500ms"] == family / "builtin_2Hz_smoothing500ms"
    assert resolve_model("builtin", frame_rate_hz=4.8).name == "builtin_5Hz_smoothing200ms"


def test_shipped_builtin_is_the_default():
    assert usp.nearest_builtin_folder() == usp.BUILTIN_MODEL_DIR
    assert usp.nearest_builtin_folder(2.0) == usp.BUILTIN_MODEL_DIR
    model = resolve_model("builtin")
    assert model.folder == str(usp.BUILTIN_MODEL_DIR.resolve()) and model.sampling_rate_hz == 2.0


# --------------------------------------------------------------------------- #
# Official names: cache, download, fallback, strict, offline, typos
# --------------------------------------------------------------------------- #


def test_cache_hit_touches_no_network(cache, served_model):
    make_model(cache / MODEL, marker="cached")
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "cache" and model.folder == str((cache / MODEL).resolve())
    assert (Path(model.folder) / "marker.txt").read_text() == "cached"
    assert served_model.requests == []


def test_cache_hit_nested_layout(cache, models_dir):
    inner = make_model(cache / MODEL / MODEL)  # e.g. a zip with a sub-folder unpacked into <cache>/<name>
    set_official(models_dir, {MODEL: refused_url()})
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "cache" and model.folder == str(inner.resolve()) and model.name == MODEL


def test_download_populates_cache_atomically(cache, served_model, monkeypatch):
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "downloaded" and model.name == MODEL and model.requested == MODEL
    assert model.folder == str((cache / MODEL).resolve())
    assert (Path(model.folder) / "marker.txt").read_text() == "served"
    assert served_model.requests == ["/m.zip"]
    assert cache_listing(cache) == [MODEL]  # no temporaries left behind
    # the same process: the same model object, no second download
    assert resolve(MODEL, cache, strict=True) is model and served_model.requests == ["/m.zip"]
    # a new process: a cache hit, no network
    monkeypatch.setattr(usp, "PROCESS_CACHE", {})
    again = resolve(MODEL, cache, strict=True)
    assert again.source == "cache" and again.digest == model.digest and len(served_model.requests) == 1


def test_download_zip_with_subfolder(tmp_path, cache, server, models_dir):
    src = make_model(tmp_path / "src" / MODEL)
    server.routes["/nested.zip"] = zip_model(src, tmp_path / "nested.zip", subfolder=MODEL)
    set_official(models_dir, {MODEL: server.url("/nested.zip")})
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "downloaded" and model.folder == str((cache / MODEL).resolve())
    assert (cache / MODEL / "config.yaml").is_file()
    assert cache_listing(cache) == [MODEL]


def test_cache_index_link_wins_over_packaged_table(cache, served_model, models_dir):
    set_official(models_dir, {MODEL: refused_url("/old.zip")})
    (cache / "available_models.yaml").write_text(index_yaml({MODEL: served_model.url("/m.zip")}))
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "downloaded" and served_model.requests == ["/m.zip"]


def test_download_404_falls_back_to_builtin(cache, server, models_dir, caplog):
    set_official(models_dir, {MODEL: server.url("/missing.zip")})
    with caplog.at_level(logging.DEBUG):
        model = resolve(MODEL, cache, frame_rate_hz=2.0)
    assert model.source.startswith(FALLBACK_SOURCE_PREFIX) and model.is_fallback
    assert model.source == "builtin (fallback: not cached, download failed: HTTP 404)"  # short: no URL
    assert model.name == "builtin_2Hz_smoothing500ms" and model.requested == MODEL
    assert model.provenance()["model_source"] == model.source
    # one short WARNING naming the missing model, the one used and how to avoid it; the URL only at DEBUG
    (warning,) = warnings_in(caplog)
    assert MODEL in warning and "builtin_2Hz_smoothing500ms" in warning and "HTTP 404" in warning
    assert "--cascade_model builtin" in warning and "http" not in warning.replace("HTTP", "")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("/missing.zip" in m and "404" in m for m in debug)
    assert cache_listing(cache) == []


def test_connection_refused_falls_back_to_builtin(cache, models_dir, caplog):
    set_official(models_dir, {MODEL: refused_url("/m.zip")})
    with caplog.at_level(logging.WARNING):
        model = resolve(MODEL, cache)
    assert model.source == "builtin (fallback: not cached, download failed: no connection)"
    assert any("unavailable (not cached, download failed: no connection)" in m for m in warnings_in(caplog))
    assert cache_listing(cache) == []


def test_failed_download_is_tried_once_per_process(cache, server, models_dir, caplog):
    set_official(models_dir, {MODEL: server.url("/missing.zip")})
    with caplog.at_level(logging.INFO):
        first = resolve(MODEL, cache, frame_rate_hz=2.0)
        second = resolve(MODEL, cache, frame_rate_hz=2.0)
    assert first is second and first.is_fallback
    assert server.requests == ["/missing.zip"]
    assert len([m for m in warnings_in(caplog) if "unavailable" in m]) == 1  # the choice is logged once


def test_one_warning_for_one_missing_model_whatever_the_builtin_models_standing_in(cache, server, family, caplog):
    """The sample's subjects at 2 and 2.6 Hz use two builtin models for one missing model: one WARNING."""
    set_official(family, {MODEL: server.url("/missing.zip")})
    with caplog.at_level(logging.INFO):
        first, second = resolve(MODEL, cache, frame_rate_hz=2.0), resolve(MODEL, cache, frame_rate_hz=2.6)
    assert first.name != second.name and first.source == second.source and second.is_fallback
    assert len(warnings_in(caplog)) == 1
    assert any(second.name in r.getMessage() and MODEL in r.getMessage() for r in caplog.records)


def test_offline_falls_back(cache, served_model):
    model = resolve(MODEL, cache, offline=True)
    assert model.is_fallback and "--offline" in model.source
    assert served_model.requests == []


def test_strict_download_failure_is_actionable_error(cache, server, models_dir):
    set_official(models_dir, {MODEL: server.url("/missing.zip")})
    with pytest.raises(ModelResolutionError) as info:
        resolve(MODEL, cache, strict=True)
    message = str(info.value)
    assert MODEL in message and "--strict_model" in message and str(cache / MODEL) in message
    assert "--model_dir" in message and "\n" not in message


def test_invalid_model_name_is_error(cache, models_dir):
    with pytest.raises(ModelResolutionError, match="invalid CASCADE model name"):
        resolve("../etc", cache)


def test_typo_is_an_error_naming_the_closest_official_names(cache, monkeypatch):
    """The real table: 'Global_EXC_2Hz' is no model, and must not run the builtin with exit 0."""
    with pytest.raises(ModelResolutionError) as info:
        resolve("Global_EXC_2Hz", cache)
    message = str(info.value)
    assert "unknown CASCADE model 'Global_EXC_2Hz'" in message and "did you mean" in message
    assert "Global_EXC_2Hz_smoothing500ms" in message or "Global_EXC_2Hz_smoothing300ms" in message
    assert "\n" not in message and cache_listing(cache) == []
    with pytest.raises(ModelResolutionError, match="unknown CASCADE model 'Global_EXC_99Hz_smoothing1ms'"):
        resolve("Global_EXC_99Hz_smoothing1ms", cache)
    with pytest.raises(ModelResolutionError, match="unknown CASCADE model 'xyz'.*official_models.yaml"):
        resolve("xyz", cache)


def test_a_cached_model_that_is_not_official_is_used(cache, models_dir):
    make_model(cache / "my_lab_model_3Hz", name="my_lab_model_3Hz", rate=3.0)
    model = resolve("my_lab_model_3Hz", cache, strict=True, offline=True)
    assert model.source == "cache" and model.sampling_rate_hz == 3.0


def test_corrupt_cache_entry_is_redownloaded(cache, served_model, caplog):
    stale = make_model(cache / MODEL, marker="stale")
    h5 = stale / "Model_NoiseLevel_2_Ensemble_0.h5"
    h5.write_bytes(h5.read_bytes()[:100])  # truncated copy
    with caplog.at_level(logging.WARNING):
        model = resolve(MODEL, cache, strict=True)
    assert model.source == "downloaded" and read_model_folder(cache / MODEL).name == MODEL
    assert (cache / MODEL / "marker.txt").read_text() == "served"
    assert any("incomplete" in m for m in warnings_in(caplog))
    assert cache_listing(cache) == [MODEL]


def test_partial_cache_entry_is_redownloaded(cache, served_model):
    (cache / MODEL).mkdir()
    (cache / MODEL / "config.yaml").write_text("model_name: x\n")  # interrupted copy
    model = resolve(MODEL, cache, strict=True)
    assert model.source == "downloaded" and cache_listing(cache) == [MODEL]


def test_corrupt_cache_entry_and_failed_download_names_folder(cache, server, models_dir):
    (cache / MODEL).mkdir()
    set_official(models_dir, {MODEL: server.url("/missing.zip")})
    with pytest.raises(ModelResolutionError) as info:
        resolve(MODEL, cache, strict=True)
    assert f"cache entry {cache / MODEL} is incomplete" in str(info.value)
    model = resolve(MODEL, cache)
    assert model.source == "builtin (fallback: cache entry incomplete, download failed: HTTP 404)"
    assert (cache / MODEL).is_dir()  # left as it was when nothing better was obtained


@pytest.mark.parametrize("mode", ["connection_cut", "truncated_file", "html_page", "bad_crc", "bad_model"])
def test_broken_download_never_installs(tmp_path, cache, server, models_dir, mode):
    source = make_model(tmp_path / "src" / MODEL)
    if mode == "bad_model":  # a sound zip whose weight file is cut short
        h5 = source / "Model_NoiseLevel_3_Ensemble_0.h5"
        h5.write_bytes(h5.read_bytes()[:5000])
    zip_bytes = zip_model(source, tmp_path / "m.zip")
    if mode == "connection_cut":  # Content-Length announced, half the body sent
        server.routes["/m.zip"] = zip_bytes
        server.truncate.add("/m.zip")
    elif mode == "truncated_file":  # a truncated zip served completely
        server.routes["/m.zip"] = zip_bytes[: len(zip_bytes) * 2 // 3]
    elif mode == "html_page":
        server.routes["/m.zip"] = b"<html><body>Too many requests</body></html>"
    elif mode == "bad_crc":  # flip one byte in the compressed data of the first member
        corrupt = bytearray(zip_bytes)
        corrupt[200] ^= 0xFF
        server.routes["/m.zip"] = bytes(corrupt)
    else:
        server.routes["/m.zip"] = zip_bytes
    with pytest.raises(ModelDownloadError):
        download_model(MODEL, server.url("/m.zip"), cache, timeout_s=TIMEOUT)
    assert cache_listing(cache) == []
    set_official(models_dir, {MODEL: server.url("/m.zip")})
    model = resolve(MODEL, cache)
    assert model.is_fallback and not (cache / MODEL).exists() and cache_listing(cache) == []


def test_zip_without_model_is_rejected(tmp_path, cache, server):
    folder = make_model(tmp_path / "src" / MODEL)
    (folder / "config.yaml").unlink()
    server.routes["/m.zip"] = zip_model(folder, tmp_path / "m.zip")
    with pytest.raises(ModelDownloadError, match="no config.yaml"):
        download_model(MODEL, server.url("/m.zip"), cache, timeout_s=TIMEOUT)
    assert cache_listing(cache) == []


def test_zip_with_unsafe_path_is_rejected(tmp_path, cache, server):
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("../evil.txt", "x")
    server.routes["/evil.zip"] = zip_path.read_bytes()
    with pytest.raises(ModelDownloadError, match="unsafe path"):
        download_model(MODEL, server.url("/evil.zip"), cache, timeout_s=TIMEOUT)
    assert not (tmp_path / "evil.txt").exists() and cache_listing(cache) == []


def test_concurrent_winner_is_kept(cache, served_model):
    """Another process (e.g. a SLURM array task) installs the model while we download."""
    zip_bytes = served_model.routes["/m.zip"]

    def winner_installs_then_serves():
        make_model(cache / MODEL, marker="winner")
        return zip_bytes

    served_model.routes["/m.zip"] = winner_installs_then_serves
    folder = download_model(MODEL, served_model.url("/m.zip"), cache, timeout_s=TIMEOUT)
    assert folder == cache / MODEL and (folder / "marker.txt").read_text() == "winner"
    assert cache_listing(cache) == [MODEL]


def test_stale_temporaries_are_cleaned(cache, served_model):
    old = cache / f".{MODEL}.deadbeef.zip.tmp"
    old.write_bytes(b"partial")
    os.utime(old, (1, 1))
    old_dir = cache / f".{MODEL}.0ld.tmp"
    old_dir.mkdir()
    os.utime(old_dir, (1, 1))
    fresh = cache / f".{MODEL}.cafe.extract.tmp"
    fresh.mkdir()  # may belong to a running process: kept
    download_model(MODEL, served_model.url("/m.zip"), cache, timeout_s=TIMEOUT)
    assert cache_listing(cache) == sorted([MODEL, fresh.name])


# --------------------------------------------------------------------------- #
# auto
# --------------------------------------------------------------------------- #


AUTO_NAMES = [
    "Global_EXC_2Hz_smoothing500ms",
    "Global_EXC_2.5Hz_smoothing400ms_high_noise",
    "Global_EXC_7.5Hz_smoothing200ms",
]


def test_auto_picks_model_by_frame_rate(cache, server, models_dir):
    for name in AUTO_NAMES:
        make_model(cache / name, name=name, rate=parse_model_sampling_rate_hz(name))
    set_official(models_dir, {name: server.url(f"/{name}.zip") for name in OFFICIAL_NAMES})
    for rate, expected in [(1.84, AUTO_NAMES[0]), (2.56, AUTO_NAMES[1]), (7.4, AUTO_NAMES[2])]:
        model = resolve("auto", cache, strict=True, frame_rate_hz=rate)
        assert (model.name, model.source, model.requested) == (expected, "cache", "auto")
        assert model.sampling_rate_hz == parse_model_sampling_rate_hz(expected)
    assert server.requests == []
    with pytest.raises(ModelResolutionError, match="frame rate"):
        resolve("auto", cache)


def test_auto_downloads_when_not_cached(tmp_path, cache, server, models_dir):
    name = "Global_EXC_7.5Hz_smoothing200ms"
    server.routes["/m75.zip"] = zip_model(
        make_model(tmp_path / "src" / name, name=name, rate=7.5, smoothing=0.2), tmp_path / "m75.zip"
    )
    links = {other: refused_url() for other in OFFICIAL_NAMES}
    set_official(models_dir, dict(links, **{name: server.url("/m75.zip")}))
    model = resolve("auto", cache, frame_rate_hz=7.4, strict=True)
    assert model.name == name and model.source == "downloaded" and model.requested == "auto"


def test_auto_offline_uses_the_nearest_builtin(family, cache, caplog):
    set_official(family, {name: refused_url() for name in AUTO_NAMES})
    with caplog.at_level(logging.INFO):
        model = resolve("auto", cache, frame_rate_hz=2.45, offline=True, strict=True)
    assert (model.name, model.source, model.requested) == ("builtin_2.4Hz_smoothing500ms", "builtin", "auto")
    assert not model.is_fallback and warnings_in(caplog) == []  # by design, not a fallback
    assert any(
        "'auto' chose Global_EXC_2.5Hz" in r.getMessage() and "--offline" in r.getMessage() for r in caplog.records
    )
    # cached, the official model is used offline too
    make_model(cache / AUTO_NAMES[2], name=AUTO_NAMES[2], rate=7.5)
    assert resolve("auto", cache, frame_rate_hz=7.4, offline=True).source == "cache"


def test_auto_download_failure_falls_back_to_the_nearest_builtin(family, cache):
    set_official(family, {name: refused_url() for name in AUTO_NAMES})
    model = resolve("auto", cache, frame_rate_hz=1.9)
    assert model.is_fallback and model.name == "builtin_1.85Hz_smoothing500ms" and model.requested == "auto"
    with pytest.raises(ModelResolutionError, match="--strict_model"):
        resolve("auto", cache, frame_rate_hz=1.9, strict=True)


# --------------------------------------------------------------------------- #
# What the driver uses: rate mismatch, per-process loading
# --------------------------------------------------------------------------- #


def test_rate_mismatch_is_measured_not_warned(tmp_path, models_dir, caplog):
    folder = make_model(tmp_path / "m30", rate=30.0, smoothing=0.05)
    with caplog.at_level(logging.WARNING):
        model = resolve_model(model_dir=folder, frame_rate_hz=2.0)
    assert warnings_in(caplog) == []  # the driver decides, per subject
    assert usp.rate_mismatch(model, 2.0) == pytest.approx(14.0)
    assert usp.rate_mismatch(model, 30.0) == 0.0
    assert usp.RATE_MISMATCH_WARN_FRACTION == 0.05


def test_read_model_folder_once_shares_the_weights(tmp_path):
    folder = make_model(tmp_path / "m")
    first = usp.read_model_folder_once(str(folder), "cache")
    second = usp.read_model_folder_once(folder / ".." / "m", "downloaded", "auto")
    assert second.ensembles is first.ensembles and (second.source, second.requested) == ("downloaded", "auto")
    assert list(usp.PROCESS_CACHE["models"]) == [str(folder.resolve())]
