"""`pip install .`: the module, its console script and the builtin models, in a fresh venv.

The venv sees this interpreter's packages (--system-site-packages, and a .pth naming this
interpreter's site folders, so it works from inside a venv too), so nothing is downloaded:
the package is installed with --no-deps --no-build-isolation --no-index from a copy of the
repository (a build writes build/ and *.egg-info into its source folder; the checkout stays clean).
"""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import unified_spike_processing_coo as usp

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python 3.11+ or tomli")

REPO_DIR = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_DIR / "pyproject.toml").read_text(encoding="utf-8"))
SHARE = Path("share", "unified_spike_processing_coo", "models")
NOT_PACKAGED = (".git", "sample_data", "tests", "benchmarks", "tools", "build", "dist", "*.egg-info", "__pycache__")
NOT_PACKAGED += (".pytest_cache", ".venv", "out", "outputs", ".ci")


def requirement_lines(path: Path) -> list:
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def test_dependencies_are_those_of_requirements_txt():
    assert PYPROJECT["project"]["dependencies"] == requirement_lines(REPO_DIR / "requirements.txt")


def test_every_builtin_model_is_installed_where_the_module_looks():
    assert Path(sys.prefix) / SHARE in usp.MODEL_SEARCH_DIRS
    data_files = PYPROJECT["tool"]["setuptools"]["data-files"]
    assert data_files[SHARE.as_posix()] == ["models/official_models.yaml"]
    builtin = sorted(p.name for p in (REPO_DIR / "models").glob("builtin_*Hz_smoothing*ms") if p.is_dir())
    assert builtin, "no builtin model in models/"
    for name in builtin:
        patterns = data_files.get((SHARE / name).as_posix())
        assert patterns, f"models/{name} is not installed: add it to [tool.setuptools.data-files] in pyproject.toml"
        listed = {p.relative_to(REPO_DIR) for pattern in patterns for p in REPO_DIR.glob(pattern)}
        present = {p.relative_to(REPO_DIR) for p in (REPO_DIR / "models" / name).iterdir() if p.is_file()}
        assert listed == present, f"pyproject.toml installs {sorted(map(str, listed))} of models/{name}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv folder, a working folder outside the repository) after `pip install`."""
    try:
        from setuptools import __version__ as setuptools_version
    except ImportError:
        pytest.skip("setuptools is not installed: --no-build-isolation needs the build backend here")
    if int(setuptools_version.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools_version} is older than pyproject.toml's build requirement (>=64)")
    root = tmp_path_factory.mktemp("install")
    source, venv, work = root / "source", root / "venv", root / "work"
    work.mkdir()
    shutil.copytree(REPO_DIR, source, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()[-500:]}")
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work).strip()
    parent_sites = [*site.getsitepackages(), site.getusersitepackages()]
    Path(site_packages, "_parent_site_packages.pth").write_text("\n".join(parent_sites) + "\n", encoding="utf-8")
    if subprocess.run([python, "-c", "import pip"], cwd=work, capture_output=True).returncode != 0:
        pytest.skip("pip is not importable from the new virtual environment")
    before = sorted(p.name for p in REPO_DIR.iterdir())
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
        "--no-build-isolation", str(source), cwd=work, timeout=300)  # fmt: skip
    assert sorted(p.name for p in REPO_DIR.iterdir()) == before, "the install wrote into the checkout"
    return python, venv, work


def run(*command, cwd: Path, timeout: float = 120) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    )
    return result.stdout


def test_module_imports_from_the_venv(installed):
    python, venv, work = installed
    out = run(python, "-c", "import unified_spike_processing_coo as u; print(u.__file__)", cwd=work).strip()
    assert Path(out).resolve().is_relative_to(venv.resolve()), f"imported {out}, not the installed module"
    version = run(
        python, "-c", "import importlib.metadata as m; print(m.version('unified-spike-processing-coo'))", cwd=work
    )
    assert version.strip() == PYPROJECT["project"]["version"]


def test_console_script_help(installed):
    python, venv, work = installed
    script = python.parent / ("unified-spike-processing-coo.exe" if os.name == "nt" else "unified-spike-processing-coo")
    assert script.is_file()
    out = run(script, "--help", cwd=work)
    assert "--input_dir" in out and "--output_dir" in out and "--cascade_model" in out


def test_builtin_model_and_official_index_come_from_share(installed):
    python, venv, work = installed
    code = (
        "import unified_spike_processing_coo as u\n"
        "print(u.resolve_model('builtin').folder)\n"
        "print(len(u.official_models(cache_dir='empty_cache')))\n"  # an empty cache: the installed index only
    )
    folder, official = run(python, "-c", code, cwd=work).split()
    assert Path(folder).resolve() == (venv / SHARE / "builtin_2Hz_smoothing500ms").resolve()
    assert (venv / SHARE / "official_models.yaml").is_file()
    assert int(official) == len(yaml.safe_load((REPO_DIR / "models" / "official_models.yaml").read_text()))


def test_readme_command_runs_from_any_folder(installed):
    """The README's installed command, as written but for the checkout's path, from a folder outside it (where
    sample_data is not): the console script finds the installed builtin models and writes the outputs."""
    python, venv, work = installed
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    (command,) = [line for line in readme.splitlines() if line.startswith("unified-spike-processing-coo ")]
    args = command.replace("/path/to/checkout", str(REPO_DIR)).split()[1:]
    assert f"{REPO_DIR}/sample_data" in args and "pip install /path/to/checkout" in readme
    script = python.parent / "unified-spike-processing-coo"
    run(script, *args, "--subjects", "subject_2", "--no_plots", "--offline", cwd=work, timeout=300)
    assert (work / "out" / "subject_2" / usp.METADATA_FILENAME).is_file()
    assert (work / "out" / "combined_metadata.h5").is_file()
