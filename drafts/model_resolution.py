"""CASCADE model resolution (draft of a stage of ``unified_spike_processing_coo.py``).

Resolves which CASCADE model folder (``config.yaml`` plus
``Model_NoiseLevel_<N>_Ensemble_<E>.h5``) the spike inference uses, in this order:

1. ``--model_dir DIR``: that folder (source ``'model_dir'``); an invalid folder is
   always an error.
2. ``--cascade_model builtin`` (or no model at all): the builtin model folder
   (source ``'builtin'``).
3. ``--cascade_model auto``: the official ``Global_EXC_*`` model whose sampling rate
   is nearest the subject's frame rate (see :func:`choose_auto_model_name`); then as
   a named model.
4. ``--cascade_model NAME`` found complete in the local cache ``--model_cache``
   (default ``~/.cache/neuralib/cascade``, the folder neuralib uses, so models that
   neuralib or CASCADE users already downloaded are reused; source ``'cache'``).
5. Otherwise downloaded into the cache (link from CASCADE's index fetched at run
   time, else from the embedded table of official links; the zip is checked and
   extracted in a temporary folder inside the cache and moved into place with one
   ``os.replace``, so a partial download never counts as a model; source
   ``'downloaded'``).
6. If that fails: the builtin model, with a WARNING (source
   ``'builtin (fallback: <reason>)'``), or, with ``--strict_model``, a
   :class:`ModelResolutionError`.  Production SLURM runs should pass
   ``--strict_model`` (and pre-populate the cache on a node with internet) so that a
   cluster node without internet fails loudly instead of silently using another
   model than the one requested.

The chosen model is returned as a :class:`ModelChoice`; ``ModelChoice.as_attrs()``
gives the attributes recorded in every output (name, source, folder, sampling rate,
smoothing, requested model).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
import types
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping

import yaml

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# Constants
# --------------------------------------------------------------------------- #

#: CASCADE's index of official models (YAML: name -> {Link: <zip url>, Info: ...}),
#: the same download link the official CASCADE code uses.
OFFICIAL_MODEL_INDEX_URL = "https://drive.switch.ch/index.php/s/IJWlhwjDT3aw2ro/download"

#: Default cache folder: neuralib's CASCADE cache (``<cache>/<model name>/``).
DEFAULT_MODEL_CACHE_DIR = "~/.cache/neuralib/cascade"

#: Special values of ``--cascade_model``.
BUILTIN_MODEL_KEYWORD = "builtin"
AUTO_MODEL_KEYWORD = "auto"

#: Prefix of the model source when the builtin model replaces an unavailable one.
FALLBACK_SOURCE_PREFIX = "builtin (fallback: "

#: Default network timeout (seconds, per blocking socket operation).
DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0

#: Refuse downloads / archives larger than this (official models are ~10-40 MB).
MAX_DOWNLOAD_BYTES = 1 << 30

#: A model whose sampling rate differs from the frame rate by more than this
#: fraction is logged with a WARNING.
RATE_MISMATCH_WARN_FRACTION = 0.2

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_SWITCH_DRIVE_LINK = "https://drive.switch.ch/index.php/s/{}/download"

# Official Global_EXC_* models of CASCADE's index (available_models.yaml, update of
# May 22th 2025), as data: name -> share token of the download link.  Used when the
# index cannot be fetched, and as the candidate list of ``--cascade_model auto``.
_OFFICIAL_GLOBAL_EXC_TOKENS = (
    ("Global_EXC_1Hz_smoothing500ms", "ZAc2kNO0aqSO3ja"),
    ("Global_EXC_1Hz_smoothing1000ms", "cxwBirzdpe5OXVF"),
    ("Global_EXC_2Hz_smoothing300ms", "NNuOpxkbLFVkk7p"),
    ("Global_EXC_2Hz_smoothing500ms", "f44KVYMFC0KlJn3"),
    ("Global_EXC_2Hz_smoothing1000ms", "o3cSQkOjTuyKzu2"),
    ("Global_EXC_2.5Hz_smoothing400ms_high_noise", "lhhhLhaq8eioVA2"),
    ("Global_EXC_3Hz_smoothing400ms", "ZTAtoekfVSRHTg0"),
    ("Global_EXC_3Hz_smoothing400ms_high_noise", "YyqzYx4iZKjHLr6"),
    ("Global_EXC_3Hz_smoothing400ms_causalkernel", "3M1JxkaVf1O2yhF"),
    ("Global_EXC_4.25Hz_smoothing300ms", "nsjSB55BVZFhstp"),
    ("Global_EXC_4.25Hz_smoothing300ms_high_noise", "dofZyF2srp5It59"),
    ("Global_EXC_4.25Hz_smoothing300ms_causalkernel", "j4D74cblkUCbXaw"),
    ("Global_EXC_5Hz_smoothing200ms", "nCyQMLhjiHA8e86"),
    ("Global_EXC_5Hz_smoothing200ms_causalkernel", "EIU1BjAL0u49Sbb"),
    ("Global_EXC_6Hz_smoothing200ms", "pbkoP8F9SvwcDgG"),
    ("Global_EXC_6Hz_smoothing200ms_causalkernel", "QajDzwNbdptJSfr"),
    ("Global_EXC_7Hz_smoothing200ms", "9rCHQfoJhAQAFlQ"),
    ("Global_EXC_7Hz_smoothing200ms_causalkernel", "hHytQ0fyrSUfJfr"),
    ("Global_EXC_7.5Hz_smoothing200ms_high_noise", "v8tt0YErAkBvJxk"),
    ("Global_EXC_7.5Hz_smoothing200ms", "2XKVdJ5UNF53AMD"),
    ("Global_EXC_7.5Hz_smoothing200ms_causalkernel", "eIE80WOsjnOvRlc"),
    ("Global_EXC_10Hz_smoothing50ms", "vU7bUlVmmcGQ4mM"),
    ("Global_EXC_10Hz_smoothing50ms_causalkernel", "4Oe8LtpTzssy0XR"),
    ("Global_EXC_10Hz_smoothing100ms", "gg7i2Vm239bflNG"),
    ("Global_EXC_10Hz_smoothing100ms_causalkernel", "pRLWGjhsxe1YQrZ"),
    ("Global_EXC_10Hz_smoothing200ms", "BPdwl5MbMJLzgEU"),
    ("Global_EXC_10Hz_smoothing200ms_causalkernel", "lhTznT3n7LOVoxN"),
    ("Global_EXC_12.5Hz_smoothing100ms", "lUSNtaFtd7HLIyq"),
    ("Global_EXC_12.5Hz_smoothing100ms_causalkernel", "HjxH7F5bZNOg5YP"),
    ("Global_EXC_12.5Hz_smoothing200ms", "e60Lc44sndZlRm8"),
    ("Global_EXC_12.5Hz_smoothing200ms_causalkernel", "kT3IaGq8apVyR5t"),
    ("Global_EXC_15Hz_smoothing50ms", "JjHmm5IxDsXzGQW"),
    ("Global_EXC_15Hz_smoothing50ms_causalkernel", "ogdSZYy6J54KSfY"),
    ("Global_EXC_15Hz_smoothing100ms_high_noise", "Yh3fcZ1eTWMj7Ap"),
    ("Global_EXC_15Hz_smoothing100ms", "DH44cNbpxorMf0q"),
    ("Global_EXC_15Hz_smoothing100ms_causalkernel", "VzBMJJaeSXmXzJ4"),
    ("Global_EXC_15Hz_smoothing200ms", "kQVvbkLywUGxHnx"),
    ("Global_EXC_15Hz_smoothing200ms_causalkernel", "bupyxSmuwGaX5rD"),
    ("Global_EXC_17.5Hz_smoothing100ms", "vbl6PSDSGVfoJAq"),
    ("Global_EXC_17.5Hz_smoothing100ms_causalkernel", "uKbnx2eWzEZr0fS"),
    ("Global_EXC_17.5Hz_smoothing200ms", "PdTOGZT1Rnq6mJT"),
    ("Global_EXC_17.5Hz_smoothing200ms_causalkernel", "9akSUCiwY1pbb6e"),
    ("Global_EXC_20Hz_smoothing100ms", "tp5qkpnhHZNm3oU"),
    ("Global_EXC_20Hz_smoothing100ms_causalkernel", "SNASw9Em8jJQVvr"),
    ("Global_EXC_20Hz_smoothing200ms", "gy9zusH6oVQ7XjM"),
    ("Global_EXC_20Hz_smoothing200ms_causalkernel", "NWRMK5HmnK4MU5m"),
    ("Global_EXC_25Hz_smoothing100ms", "KJQCNESFPeduFAg"),
    ("Global_EXC_25Hz_smoothing100ms_causalkernel", "Gk1tandtyveu6BX"),
    ("Global_EXC_25Hz_smoothing50ms", "VF7Z1QbgKk4iWLv"),
    ("Global_EXC_25Hz_smoothing50ms_causalkernel", "dsKn7xOAAbi4L7i"),
    ("Global_EXC_30Hz_smoothing25ms", "qKf5Eqn9IOc7bFt"),
    ("Global_EXC_30Hz_smoothing25ms_causalkernel", "8nvQ0zDRflshnEQ"),
    ("Global_EXC_30Hz_smoothing50ms", "4wVuOV8YlOZprXU"),
    ("Global_EXC_30Hz_smoothing50ms_high_noise", "7vBrmEWHR7T8t7z"),
    ("Global_EXC_30Hz_smoothing50ms_causalkernel", "lR2zjb9VhWj8w3I"),
    ("Global_EXC_30Hz_smoothing100ms", "zi6QBF6WZWkX3db"),
    ("Global_EXC_30Hz_smoothing100ms_causalkernel", "09xIbfeEK6QUNF9"),
    ("Global_EXC_30Hz_smoothing200ms", "Ax1kaxNFJgpbr5v"),
    ("Global_EXC_30Hz_smoothing100ms_causalkernel_high_noise", "2dmjQaoOmrA7BRp"),
    ("Global_EXC_30Hz_smoothing100ms_high_noise", "c1TwwUHt6DnYRdL"),
    ("Global_EXC_30Hz_smoothing200ms_causalkernel_high_noise", "yRXTDicJaqWyiKe"),
    ("Global_EXC_40Hz_smoothing25ms_causalkernel", "Y2SIf1bIZfQIyaM"),
    ("Global_EXC_40Hz_smoothing25ms", "t9jUSqHWCZnsuoK"),
    ("Global_EXC_40Hz_smoothing25ms_high_noise", "awBxRaORqEMq7sN"),
    ("Global_EXC_40Hz_smoothing50ms", "47bIOU2N5UBpgia"),
    ("Global_EXC_40Hz_smoothing50ms_high_noise", "pBjh5brKMiy9ffy"),
    ("Global_EXC_40Hz_smoothing50ms_causalkernel", "DvYfBrUjPiGfUf1"),
    ("Global_EXC_30Hz_smoothing50ms_asymmetric_window_1_frame", "d7KCX4R2RUGClEg"),
    ("Global_EXC_30Hz_smoothing50ms_asymmetric_window_2_frames", "O7wmJreDtAN31N4"),
    ("Global_EXC_30Hz_smoothing50ms_asymmetric_window_4_frames", "NBbQajQ05qPvPSd"),
    ("Global_EXC_30Hz_smoothing50ms_asymmetric_window_6_frames", "bfla0Jk4czskWH4"),
    ("Global_EXC_30Hz_smoothing50ms_asymmetric_window_8_frames", "vzb8fNMFTyDqjg8"),
)

#: Official ``Global_EXC_*`` model name -> zip download link (read-only mapping).
OFFICIAL_GLOBAL_EXC_MODELS: Mapping[str, str] = types.MappingProxyType(
    {name: _SWITCH_DRIVE_LINK.format(token) for name, token in _OFFICIAL_GLOBAL_EXC_TOKENS}
)

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_RATE_RE = re.compile(r"(?:^|_)(\d+(?:\.\d+)?)Hz(?:_|$)")
_SMOOTHING_RE = re.compile(r"(?:^|_)smoothing(\d+(?:\.\d+)?)ms(?:_|$)")
_GLOBAL_EXC_RE = re.compile(r"^Global_EXC_(\d+(?:\.\d+)?)Hz_smoothing(\d+(?:\.\d+)?)ms(.*)$")
_IGNORED_ENTRIES = ("__MACOSX",)


# --------------------------------------------------------------------------- #
# Types
# --------------------------------------------------------------------------- #

class ModelResolutionError(Exception):
    """No usable CASCADE model; the message is one actionable line."""


class ModelDownloadError(ModelResolutionError):
    """Fetching, checking or installing a model download failed."""


@dataclass(frozen=True)
class ModelChoice:
    """The resolved CASCADE model.

    ``source`` is one of ``'model_dir'``, ``'cache'``, ``'downloaded'``,
    ``'builtin'`` or ``'builtin (fallback: <reason>)'``.  ``requested`` is what the
    user asked for (``--model_dir`` path, model name, ``'auto'`` or ``'builtin'``).
    ``sampling_rate_hz`` and ``smoothing_s`` come from the folder's config.yaml
    (``nan`` if the config has no smoothing).
    """

    name: str
    folder: Path
    source: str
    sampling_rate_hz: float
    smoothing_s: float
    requested: str = ""

    @property
    def is_fallback(self) -> bool:
        return self.source.startswith(FALLBACK_SOURCE_PREFIX)

    def as_attrs(self) -> dict:
        """Attributes recorded in every output file (str / float values only)."""
        return {
            "model_name": self.name,
            "model_source": self.source,
            "model_folder": str(self.folder),
            "model_sampling_rate_hz": float(self.sampling_rate_hz),
            "model_smoothing_s": float(self.smoothing_s),
            "model_requested": self.requested,
        }


# --------------------------------------------------------------------------- #
# Names, index and automatic choice
# --------------------------------------------------------------------------- #

def default_model_cache_dir() -> Path:
    """The default ``--model_cache`` (neuralib's cache), user home expanded."""
    return Path(DEFAULT_MODEL_CACHE_DIR).expanduser()


def parse_model_sampling_rate_hz(name: str) -> float:
    """Sampling rate from a model name, e.g. ``Global_EXC_2.5Hz_smoothing400ms_high_noise`` -> 2.5."""
    match = _RATE_RE.search(str(name))
    if match is None:
        raise ValueError(f"no sampling rate ('<rate>Hz') in CASCADE model name {name!r}")
    return float(match.group(1))


def parse_model_smoothing_ms(name: str) -> float:
    """Smoothing from a model name, e.g. ``Global_EXC_2Hz_smoothing500ms`` -> 500.0."""
    match = _SMOOTHING_RE.search(str(name))
    if match is None:
        raise ValueError(f"no smoothing ('smoothing<ms>ms') in CASCADE model name {name!r}")
    return float(match.group(1))


def _variant_rank(suffix: str) -> int:
    """0 plain, 1 ``_high_noise``, 2 ``_causalkernel``, 3 anything else."""
    if suffix == "":
        return 0
    if suffix == "_high_noise":
        return 1
    if suffix == "_causalkernel":
        return 2
    return 3


def choose_auto_model_name(frame_rate_hz: float, names: Iterable[str]) -> str:
    """Official ``Global_EXC_*`` model best matching ``frame_rate_hz``.

    Rule (deterministic, independent of the order of ``names``):

    1. only names ``Global_EXC_<rate>Hz_smoothing<ms>ms[<suffix>]`` are candidates;
    2. nearest sampling rate, ``|rate - frame_rate_hz|`` (an exact tie between a
       lower and a higher rate is decided by the next keys);
    3. plain variant first, then ``_high_noise``, then ``_causalkernel``, then any
       other suffix (e.g. ``_asymmetric_window_*``): symmetric kernels keep spike
       timing unbiased;
    4. smoothing nearest one frame interval (``1000 / frame_rate_hz`` ms; gives
       500 ms at 2 Hz, the builtin's smoothing), ties to the smaller smoothing;
    5. lower sampling rate, then the name.

    E.g. 1.84 Hz -> ``Global_EXC_2Hz_smoothing500ms``, 2.56 Hz ->
    ``Global_EXC_2.5Hz_smoothing400ms_high_noise`` (the only 2.5 Hz model),
    7.4 Hz -> ``Global_EXC_7.5Hz_smoothing200ms``.
    """
    rate = float(frame_rate_hz)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"frame rate must be a positive number of Hz, got {frame_rate_hz!r}")
    target_smoothing_ms = 1000.0 / rate
    best_key = None
    best_name = None
    for name in names:
        match = _GLOBAL_EXC_RE.match(str(name))
        if match is None:
            continue
        model_rate = float(match.group(1))
        smoothing_ms = float(match.group(2))
        key = (
            round(abs(model_rate - rate), 9),
            _variant_rank(match.group(3)),
            round(abs(smoothing_ms - target_smoothing_ms), 9),
            smoothing_ms,
            model_rate,
            str(name),
        )
        if best_key is None or key < best_key:
            best_key, best_name = key, str(name)
    if best_name is None:
        raise ValueError("no official Global_EXC_<rate>Hz_smoothing<ms>ms model among the candidates")
    return best_name


def parse_model_index(text: str | bytes) -> dict:
    """Parse CASCADE's ``available_models.yaml``: returns ``{name: link}``.

    Entries without a string ``Link`` are skipped; anything that is not a YAML
    mapping raises ``ValueError``.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"model index is not valid YAML: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ValueError("model index is not a YAML mapping of model names")
    links = {}
    for name, entry in data.items():
        if isinstance(entry, dict):
            link = entry.get("Link")
            if isinstance(link, str) and link.strip():
                links[str(name)] = link.strip()
    return links


def fetch_model_index(index_url: str = OFFICIAL_MODEL_INDEX_URL,
                      timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S) -> dict:
    """Download and parse CASCADE's model index (``{name: link}``)."""
    request = urllib.request.Request(index_url, headers={"User-Agent": "unified-spike-processing"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = response.read(MAX_DOWNLOAD_BYTES)
    return parse_model_index(data)


def lookup_model_link(name: str,
                      index_url: str | None = OFFICIAL_MODEL_INDEX_URL,
                      known_models: Mapping[str, str] | None = OFFICIAL_GLOBAL_EXC_MODELS,
                      timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                      cache_dir: str | Path | None = None) -> str:
    """Download link of model ``name``.

    Looked up, in order, in the index fetched from ``index_url`` (at run time, like
    neuralib), in ``<cache_dir>/available_models.yaml`` (the copy neuralib keeps), and
    in ``known_models`` (the embedded official table).  Raises
    :class:`ModelDownloadError` if none knows the name.
    """
    problems = []
    if index_url:
        try:
            links = fetch_model_index(index_url, timeout_s)
        except (OSError, ValueError) as exc:
            problems.append(f"index {index_url} unavailable ({_one_line(exc)})")
            logger.info("CASCADE model index %s unavailable: %s", index_url, _one_line(exc))
        else:
            if name in links:
                return links[name]
            problems.append(f"not in index {index_url}")
    if cache_dir is not None:
        local_index = Path(cache_dir).expanduser() / "available_models.yaml"
        if local_index.is_file():
            try:
                links = parse_model_index(local_index.read_bytes())
            except (OSError, ValueError) as exc:
                problems.append(f"{local_index} unreadable ({_one_line(exc)})")
            else:
                if name in links:
                    return links[name]
                problems.append(f"not in {local_index}")
    if known_models and name in known_models:
        return known_models[name]
    problems.append("not an embedded official Global_EXC model")
    raise ModelDownloadError(f"no download link for CASCADE model '{name}': " + "; ".join(problems))


# --------------------------------------------------------------------------- #
# Model folder checks
# --------------------------------------------------------------------------- #

def _one_line(value, limit: int = 400) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hdf5_problem(path: Path) -> str | None:
    """None if ``path`` looks like a whole HDF5 file, else what is wrong.

    Checks the signature (at 0 or a user-block offset 512, 1024, ...) and that the
    file is at least as long as the end-of-file address in the superblock (catches
    truncated copies).
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return f"{path.name} is empty"
        with open(path, "rb") as handle:
            base = None
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size and offset <= (1 << 20):
                handle.seek(offset)
                if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    base = offset
                    break
                offset = 512 if offset == 0 else offset * 2
            if base is None:
                return f"{path.name} is not an HDF5 file"
            handle.seek(base)
            head = handle.read(96)
    except OSError as exc:
        return f"{path.name} unreadable ({_one_line(exc)})"
    if len(head) < 12:
        return f"{path.name} is truncated (superblock)"
    version = head[8]
    if version in (0, 1):
        if len(head) < 14:
            return f"{path.name} is truncated (superblock)"
        size_of_offsets = head[13]
        start = 24 if version == 0 else 28
    elif version in (2, 3):
        size_of_offsets = head[9]
        start = 12
    else:
        return None  # unknown superblock version: signature check only
    if size_of_offsets not in (2, 4, 8):
        return None
    end = start + 3 * size_of_offsets
    if len(head) < end:
        return f"{path.name} is truncated (superblock)"
    base_address = int.from_bytes(head[start:start + size_of_offsets], "little")
    eof_start = start + 2 * size_of_offsets
    eof_address = int.from_bytes(head[eof_start:end], "little")
    undefined = (1 << (8 * size_of_offsets)) - 1
    if eof_address == undefined or base_address == undefined:
        return None
    if size < base_address + eof_address:
        return f"{path.name} is truncated ({size} of {base_address + eof_address} bytes)"
    return None


def read_model_config(folder: str | Path) -> dict:
    """The parsed ``config.yaml`` of a model folder (raises OSError / ValueError)."""
    config_path = Path(folder) / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path} is not valid YAML ({_one_line(exc)})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a YAML mapping")
    return config


def model_folder_problem(folder: str | Path) -> str | None:
    """None if ``folder`` is a complete CASCADE model folder, else a short reason.

    Complete: ``config.yaml`` parses, has a positive ``sampling_rate`` and a
    non-empty list of integer ``noise_levels``, there is at least one
    ``Model_NoiseLevel_<N>_Ensemble_<E>.h5`` for every listed noise level, and every
    ``Model_*.h5`` is a non-empty, untruncated HDF5 file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder" if folder.exists() else "does not exist"
    if not (folder / "config.yaml").is_file():
        return "no config.yaml"
    try:
        config = read_model_config(folder)
    except (OSError, ValueError) as exc:
        return f"config.yaml unreadable ({_one_line(exc)})"
    rate = config.get("sampling_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        return "config.yaml has no positive sampling_rate"
    levels = config.get("noise_levels")
    if (not isinstance(levels, list) or not levels
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in levels)):
        return "config.yaml has no list of integer noise_levels"
    for level in levels:
        if not any(folder.glob(f"Model_NoiseLevel_{level}_Ensemble_*.h5")):
            return f"no Model_NoiseLevel_{level}_Ensemble_*.h5 file"
    for h5_path in sorted(folder.glob("Model_*.h5")):
        problem = _hdf5_problem(h5_path)
        if problem:
            return problem
    return None


def is_complete_model_folder(folder: str | Path) -> bool:
    """True if ``folder`` is a complete CASCADE model folder (see :func:`model_folder_problem`)."""
    return model_folder_problem(folder) is None


def _visible_subfolders(folder: Path) -> list:
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED_ENTRIES)


def find_model_folder(folder: str | Path) -> Path | None:
    """``folder`` itself if complete, else its only sub-folder if that is complete, else None.

    Accepts the layouts CASCADE zips unpack to (files at the top, or inside one
    sub-folder).
    """
    folder = Path(folder)
    if is_complete_model_folder(folder):
        return folder
    if folder.is_dir() and not (folder / "config.yaml").exists():
        try:
            subfolders = _visible_subfolders(folder)
        except OSError:
            return None
        if len(subfolders) == 1 and is_complete_model_folder(subfolders[0]):
            return subfolders[0]
    return None


def _describe_problem(folder: Path) -> str:
    problem = model_folder_problem(folder)
    if problem is None:
        return "complete"
    if problem == "no config.yaml" and folder.is_dir():
        try:
            subfolders = _visible_subfolders(folder)
        except OSError:
            subfolders = []
        if len(subfolders) == 1:
            return f"{subfolders[0].name}/: {model_folder_problem(subfolders[0])}"
    return problem


def _check_model_name(name: str) -> str:
    name = str(name).strip()
    if not _MODEL_NAME_RE.match(name) or ".." in name:
        raise ModelResolutionError(
            f"invalid CASCADE model name {name!r}: use an official name such as "
            f"'Global_EXC_2Hz_smoothing500ms', 'auto', 'builtin', or pass --model_dir DIR")
    return name


# --------------------------------------------------------------------------- #
# Download and atomic installation
# --------------------------------------------------------------------------- #

def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("could not remove %s: %s", path, exc)


def _remove_stale_temporaries(cache_dir: Path, name: str, max_age_s: float = 86400.0) -> None:
    """Remove temporaries of ``name`` left by killed runs (older than ``max_age_s``)."""
    now = time.time()
    for path in cache_dir.glob(f".{name}.*.tmp"):
        try:
            if now - path.lstat().st_mtime > max_age_s:
                _remove_path(path)
        except OSError:
            pass


def _download_to_file(url: str, dest: Path, timeout_s: float) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": "unified-spike-processing"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        written = 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > MAX_DOWNLOAD_BYTES:
                raise ModelDownloadError(f"download from {url} exceeds {MAX_DOWNLOAD_BYTES} bytes")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if expected is not None and expected.strip().isdigit() and int(expected) != written:
        raise ModelDownloadError(f"incomplete download from {url}: {written} of {int(expected)} bytes")
    return written


def _safe_extract(zip_path: Path, dest: Path) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        total = 0
        for info in members:
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if (not parts or info.filename.startswith(("/", "\\")) or ".." in parts
                    or ":" in parts[0]):
                raise ModelDownloadError(f"unsafe path {info.filename!r} in model archive")
            total += info.file_size
        if total > 4 * MAX_DOWNLOAD_BYTES:
            raise ModelDownloadError("model archive too large when extracted")
        bad = archive.testzip()
        if bad is not None:
            raise ModelDownloadError(f"corrupt member {bad!r} in model archive")
        archive.extractall(dest)


def _install_folder(source: Path, target: Path) -> Path:
    """Atomically move the complete model folder ``source`` to ``target``.

    An incomplete ``target`` is moved aside and removed; a complete ``target``
    (another process won the race, e.g. a SLURM array job sharing the cache) is
    kept and ``source`` discarded.  Returns the installed model folder.
    """
    last_error: OSError | None = None
    for _attempt in range(3):
        existing = find_model_folder(target) if target.exists() else None
        if existing is not None:
            logger.info("CASCADE model %s was installed concurrently; using it", target)
            return existing
        if target.exists() or target.is_symlink():
            aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.stale.tmp")
            try:
                os.replace(target, aside)
            except FileNotFoundError:
                pass
            else:
                logger.warning("moved incomplete CASCADE model folder %s aside and removed it", target)
                _remove_path(aside)
        try:
            os.replace(source, target)
        except OSError as exc:
            last_error = exc
            continue  # target re-appeared meanwhile: re-check it
        return target
    existing = find_model_folder(target)
    if existing is not None:
        return existing
    raise ModelDownloadError(f"could not install model folder into {target} ({_one_line(last_error)})")


def download_model(name: str,
                   cache_dir: str | Path,
                   index_url: str | None = OFFICIAL_MODEL_INDEX_URL,
                   timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                   known_models: Mapping[str, str] | None = OFFICIAL_GLOBAL_EXC_MODELS,
                   link: str | None = None) -> Path:
    """Download model ``name`` into ``<cache_dir>/<name>`` and return its folder.

    The zip is written to a temporary file inside ``cache_dir``, checked (size
    against Content-Length, zip structure and CRCs, no unsafe paths), extracted into
    a temporary folder inside ``cache_dir`` (files at the top level or inside one
    sub-folder), validated with :func:`model_folder_problem`, and moved into place
    with ``os.replace``: ``<cache_dir>/<name>`` is either absent, left as it was, or
    a complete model.  Temporaries are named ``.<name>.<random>.tmp`` and removed.
    Raises :class:`ModelDownloadError` (one line) on any failure.
    """
    name = _check_model_name(name)
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / name
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelDownloadError(f"cannot create model cache {cache_dir} ({_one_line(exc)})") from exc
    if link is None:
        link = lookup_model_link(name, index_url, known_models, timeout_s, cache_dir)
    _remove_stale_temporaries(cache_dir, name)
    zip_path = None
    extract_dir = None
    try:
        fd, zip_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".zip.tmp", dir=cache_dir)
        os.close(fd)
        zip_path = Path(zip_name)
        logger.info("downloading CASCADE model %s from %s", name, link)
        size = _download_to_file(link, zip_path, timeout_s)
        if not zipfile.is_zipfile(zip_path):
            raise ModelDownloadError(f"download of '{name}' from {link} is not a zip archive ({size} bytes)")
        extract_dir = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".extract.tmp", dir=cache_dir))
        _safe_extract(zip_path, extract_dir)
        model_root = find_model_folder(extract_dir)
        if model_root is None:
            raise ModelDownloadError(
                f"archive of '{name}' from {link} holds no complete CASCADE model "
                f"({_describe_problem(extract_dir)})")
        if model_root != extract_dir:
            # Move the sub-folder out so the folder that is renamed into place is fresh.
            staged = cache_dir / f".{name}.{uuid.uuid4().hex}.stage.tmp"
            os.replace(model_root, staged)
            _remove_path(extract_dir)
            extract_dir = staged
        installed = _install_folder(extract_dir, target)
        logger.info("CASCADE model %s installed in %s", name, installed)
        return installed
    except ModelDownloadError:
        raise
    except Exception as exc:  # OSError/URLError, http.client.HTTPException, BadZipFile, ...
        raise ModelDownloadError(f"download of CASCADE model '{name}' from {link} failed: "
                                 f"{type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        if zip_path is not None:
            _remove_path(zip_path)
        if extract_dir is not None and extract_dir.exists():  # gone once moved into place
            _remove_path(extract_dir)


# --------------------------------------------------------------------------- #
# Resolution
# --------------------------------------------------------------------------- #

def _choice_from_folder(folder: Path, source: str, requested: str, name: str | None = None) -> ModelChoice:
    config = read_model_config(folder)
    smoothing = config.get("smoothing")
    smoothing_s = (float(smoothing) if isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
                   else float("nan"))
    return ModelChoice(name=name or folder.name, folder=folder.resolve(), source=source,
                       sampling_rate_hz=float(config["sampling_rate"]), smoothing_s=smoothing_s,
                       requested=requested)


def _builtin_choice(builtin_dir: str | Path, source: str, requested: str) -> ModelChoice:
    builtin_dir = Path(builtin_dir).expanduser()
    folder = find_model_folder(builtin_dir)
    if folder is None:
        raise ModelResolutionError(
            f"builtin CASCADE model folder {builtin_dir} is unusable ({_describe_problem(builtin_dir)}); "
            f"restore it from the repository (models/) or pass --model_dir DIR")
    return _choice_from_folder(folder, source, requested)


def _log_choice(choice: ModelChoice, frame_rate_hz: float | None) -> None:
    log = logger.warning if choice.is_fallback else logger.info
    log("CASCADE model: %s (source: %s; folder: %s; sampling rate %g Hz; smoothing %g s)",
        choice.name, choice.source, choice.folder, choice.sampling_rate_hz, choice.smoothing_s)
    if frame_rate_hz is not None and math.isfinite(float(frame_rate_hz)) and float(frame_rate_hz) > 0:
        mismatch = abs(choice.sampling_rate_hz - float(frame_rate_hz)) / float(frame_rate_hz)
        if mismatch > RATE_MISMATCH_WARN_FRACTION:
            logger.warning("CASCADE model %s is trained for %g Hz but the frame rate is %g Hz (%.0f%% off)",
                           choice.name, choice.sampling_rate_hz, float(frame_rate_hz), 100 * mismatch)


def resolve_model(cascade_model: str | None,
                  model_dir: str | Path | None,
                  cache_dir: str | Path | None,
                  builtin_dir: str | Path,
                  strict: bool = False,
                  frame_rate_hz: float | None = None,
                  index_url: str | None = OFFICIAL_MODEL_INDEX_URL,
                  allow_download: bool = True,
                  timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
                  known_models: Mapping[str, str] | None = OFFICIAL_GLOBAL_EXC_MODELS) -> ModelChoice:
    """Resolve the CASCADE model to use (see the module docstring for the order).

    ``cascade_model``: a model name, ``'auto'``, ``'builtin'`` or None (= builtin).
    ``model_dir`` wins over ``cascade_model``.  ``cache_dir`` None means
    :func:`default_model_cache_dir`.  ``frame_rate_hz`` is needed for ``'auto'``
    and is used to warn about a model/frame-rate mismatch.  ``known_models`` is the
    embedded table of official links (also the candidates of ``'auto'``, so the auto
    choice never depends on the network).  ``strict`` turns the builtin fallback into
    a :class:`ModelResolutionError`; an invalid ``model_dir`` or an unusable builtin
    model is always an error.
    """
    if model_dir is not None and str(model_dir) != "":
        folder_arg = Path(model_dir).expanduser()
        if cascade_model not in (None, ""):
            logger.info("--model_dir %s takes precedence over --cascade_model %s", folder_arg, cascade_model)
        folder = find_model_folder(folder_arg)
        if folder is None:
            raise ModelResolutionError(
                f"--model_dir {folder_arg} is not a CASCADE model folder ({_describe_problem(folder_arg)}); "
                f"pass a folder holding config.yaml and Model_NoiseLevel_<N>_Ensemble_<E>.h5 files")
        choice = _choice_from_folder(folder, "model_dir", str(model_dir))
        _log_choice(choice, frame_rate_hz)
        return choice

    requested = (cascade_model or "").strip()
    if requested == "" or requested.lower() == BUILTIN_MODEL_KEYWORD:
        choice = _builtin_choice(builtin_dir, "builtin", requested or BUILTIN_MODEL_KEYWORD)
        _log_choice(choice, frame_rate_hz)
        return choice

    if requested.lower() == AUTO_MODEL_KEYWORD:
        if frame_rate_hz is None:
            raise ModelResolutionError("--cascade_model auto needs the subject's frame rate; "
                                       "pass --cascade_model NAME or --model_dir DIR")
        candidates = list(known_models or OFFICIAL_GLOBAL_EXC_MODELS)
        try:
            name = choose_auto_model_name(frame_rate_hz, candidates)
        except ValueError as exc:
            raise ModelResolutionError(f"--cascade_model auto: {_one_line(exc)}; "
                                       f"pass --cascade_model NAME or --model_dir DIR") from exc
        logger.info("--cascade_model auto: frame rate %g Hz -> %s", float(frame_rate_hz), name)
    else:
        name = _check_model_name(requested)

    cache = Path(cache_dir).expanduser() if cache_dir not in (None, "") else default_model_cache_dir()
    target = cache / name
    folder = find_model_folder(target) if target.exists() else None
    if folder is not None:
        choice = _choice_from_folder(folder, "cache", requested, name=name)
        _log_choice(choice, frame_rate_hz)
        return choice

    incomplete = ""
    if target.exists():
        incomplete = f"cache entry {target} is incomplete ({_describe_problem(target)})"
        logger.warning("%s; it will be replaced by a fresh download", incomplete)

    if allow_download:
        try:
            folder = download_model(name, cache, index_url=index_url, timeout_s=timeout_s,
                                    known_models=known_models)
        except ModelDownloadError as exc:
            reason = _one_line(exc)
        else:
            choice = _choice_from_folder(folder, "downloaded", requested, name=name)
            _log_choice(choice, frame_rate_hz)
            return choice
    else:
        reason = f"'{name}' is not in the cache {cache} and downloads are disabled"
    if incomplete:
        reason = f"{incomplete}; {reason}"

    if strict:
        raise ModelResolutionError(
            f"--strict_model: CASCADE model '{name}' is unavailable: {reason}. Fix: on a machine with "
            f"internet run once without --strict_model (or unzip the model's download) and copy the "
            f"model folder to {target}, or pass --model_dir DIR")
    logger.warning("CASCADE model '%s' unavailable (%s); falling back to the builtin model %s "
                   "(use --strict_model to make this an error)", name, reason, builtin_dir)
    try:
        choice = _builtin_choice(builtin_dir, f"{FALLBACK_SOURCE_PREFIX}{reason})", requested)
    except ModelResolutionError as exc:
        raise ModelResolutionError(f"CASCADE model '{name}' is unavailable ({reason}) and {exc}") from exc
    _log_choice(choice, frame_rate_hz)
    return choice
