"""What `pip install .` and `pip install -e .` put into a fresh environment: the package, nothing generic.

The repository keeps the baselines at the top level (baselines/); setup.py installs them as
fedml_feddpd.baselines, so a regular install adds only fedml_feddpd and its dist-info, and an editable one
maps fedml_feddpd.baselines back to the repository's folder.
"""
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import ROOT

SKIP = shutil.ignore_patterns(".git", "runs", "docs", "build", "dist", "*.egg-info", "__pycache__", ".device",
                              ".pytest_cache", "logs")


def _fresh_env(tmp_path: Path, system_packages: bool) -> tuple[Path, Path]:
    """A venv without pip (the running pip installs into it) and its site-packages."""
    env = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=system_packages, with_pip=False).create(env)
    site = next((env / "lib").glob("python*/site-packages"))
    return env / "bin" / "python", site


def _install(python: Path, source: Path, editable: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
           "--no-build-isolation"] + (["-e"] if editable else []) + [str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _where(python: Path, module: str, cwd: Path) -> str:
    """The file `module` is found in, by `python` started in `cwd` (no import of its dependencies)."""
    code = f"import importlib.util as u; print(u.find_spec({module!r}).origin)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_adds_only_the_package_and_its_baselines_import_from_it(tmp_path, editable):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)
    # The venv's own site-packages starts empty and comes first; this environment's packages stay visible for the
    # build backend (setuptools) and for the package's dependencies.
    python, site = _fresh_env(tmp_path, system_packages=True)
    _install(python, source, editable)
    added = set(os.listdir(site))
    dist_info = {n for n in added if n.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("fedml_feddpd-")
    if editable:  # setuptools' editable finder: a .pth and its mapping, nothing importable by a generic name
        assert {n for n in added - dist_info if not n.startswith("__")} == set(), added  # and __pycache__
        finder = next(site.glob("__editable__*finder.py")).read_text()
        assert f"'fedml_feddpd.baselines': '{source / 'baselines'}'" in finder
    else:
        assert added - dist_info == {"fedml_feddpd"}, added
        assert (site / "fedml_feddpd" / "baselines" / "feddiff.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _where(python, "fedml_feddpd.baselines", elsewhere)
    expected = source / "baselines" if editable else site / "fedml_feddpd" / "baselines"
    assert found == str(expected / "__init__.py")
    assert _where(python, "fedml_feddpd", elsewhere).startswith(str(source if editable else site))
