"""A built wheel, installed in a fresh virtual environment, gives `import runherd` and the
`runherd` command, and no other top-level import name."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.timeout(300)


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True, timeout=240, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT)
    [built] = out.glob("runherd-*.whl")
    return built


def test_the_wheel_holds_only_runherd(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"runherd"}
    # Both portions of the namespace are in it, with the SQL the store needs.
    assert "runherd/client.py" in names and "runherd/monitor/service.py" in names
    assert "runherd/store/queries.sql" in names and "runherd/store/migrations/0001_initial.sql" in names
    assert "runherd/ui/templates/run.html" in names  # the web view's templates
    assert not any(n.startswith("runherd/__init__.py") for n in names)  # a PEP 420 namespace package


def test_a_fresh_venv_gets_import_runherd_and_the_command(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    target = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    fresh = {p.name for p in target.iterdir()}
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    added = {p.name for p in target.iterdir()} - fresh
    assert {p for p in added if not p.endswith(".dist-info")} == {"runherd"}
    # Dependencies come from this environment's site-packages, added as a plain path: the editable
    # install's .pth there is not processed, so `runherd` can only come from the wheel.
    (target / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    code = "import runherd, runherd.client, runherd.launchers, runherd.cli; print(list(runherd.__path__))"
    out = _run(python, "-c", code, cwd=tmp_path).stdout
    assert str(target / "runherd") in out and str(ROOT) not in out
    assert _run(venv / "bin" / "runherd", "--help", cwd=tmp_path).stdout.startswith("usage: runherd")
