"""The distribution as users get it: its own name on the package index, a clash with the
other libraries that install a top-level ``pgpubsub`` package explained in one line, and a
built wheel that works in a fresh virtual environment (no clone, not editable)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pgpubsub._version import DISTRIBUTION, version

ROOT = Path(__file__).parent.parent


def fake_distribution(folder: Path, name: str, version: str) -> None:
    """A ``.dist-info`` folder as pip leaves it, enough for importlib.metadata."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def import_with(folder: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run(
        [sys.executable, "-c", "import pgpubsub"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.unit
def test_the_distribution_name_is_ours() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^name = "(.*)"$', text, re.M)[1] == DISTRIBUTION == "pgpubsub-engine"  # type: ignore[index]
    assert version() == re.search(r'^version = "(.*)"$', text, re.M)[1]  # type: ignore[index]


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, version",
    [("django-pgpubsub", "1.3.0"), ("pgpubsub", "0.0.5")],
)
def test_a_clashing_distribution_is_named_in_one_line(
    tmp_path: Path, name: str, version: str
) -> None:
    fake_distribution(tmp_path, name, version)
    result = import_with(tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pgpubsub._clash.PackageClash: "), result.stderr
    assert f"{name} {version} is installed next to pgpubsub-engine" in last
    assert f"pip uninstall {name}" in last


@pytest.mark.unit
def test_an_older_build_of_ours_is_no_clash(tmp_path: Path) -> None:
    fake_distribution(tmp_path, "pgpubsub", "0.1.0")
    result = import_with(tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.unit
def test_every_install_line_of_the_docs_names_our_distribution() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    wrong = []
    for page in pages:
        for line in page.read_text().splitlines():
            for spec in re.findall(r"pip install\s+(?:-\S+\s+)*'?([A-Za-z][\w.-]*)", line):
                if spec.startswith("pgpubsub") and spec != DISTRIBUTION:
                    wrong.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert not wrong, "\n".join(wrong)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.mark.acceptance
@pytest.mark.timeout(600)  # a fresh venv installed from the package index
def test_the_built_wheel_runs_migrate_and_the_demo_in_a_fresh_venv(
    dsn: str, tmp_path: Path
) -> None:
    """pip's cache makes the second run quick; only PyPI is reached (psycopg, msgspec)."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels)]
    run([*build, str(ROOT)])
    (wheel,) = wheels.glob("pgpubsub_engine-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    pip = [str(bin_dir / "pip"), "install", "--quiet", "--find-links", str(wheels)]
    # Run outside the clone, so that nothing of the source tree is importable.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PGPUBSUB_DSN"] = dsn
    # A clash for real: django-pgpubsub (its package only) installed first, then ours with
    # the docs' install line pointed at the wheel by --find-links.
    run([*pip, "--no-deps", "django-pgpubsub==1.3.1"])
    run([*pip, DISTRIBUTION])
    clash = subprocess.run(
        [str(bin_dir / "pgpubsub"), "--version"], capture_output=True, text=True, env=env
    )
    assert clash.returncode == 1
    line = clash.stderr.strip().splitlines()[-1]
    assert "django-pgpubsub 1.3.1 is installed next to pgpubsub-engine" in line, clash.stderr
    # The fix the line gives, as written (pip finds our wheel through --find-links).
    fix = line.split("run `")[1]
    uninstall, reinstall = fix.split("` then `")[0], fix.split("` then `")[1].rstrip("`")
    run([str(bin_dir / "pip"), *uninstall.split()[1:], "--yes"])
    run([str(bin_dir / "pip"), *reinstall.split()[1:], "--no-deps", "--find-links", str(wheels)])
    where = run(
        [str(bin_dir / "python"), "-c", "import pgpubsub; print(pgpubsub.__file__)"],
        cwd=outside,
        env=env,
    )
    assert where.stdout.startswith(str(env_dir)), where.stdout
    assert wheel.name.startswith("pgpubsub_engine-")
    migrate = run([str(bin_dir / "pgpubsub"), "migrate"], cwd=outside, env=env)
    assert "pgpubsub schema is up to date" in migrate.stdout
    demo = run([str(bin_dir / "pgpubsub"), "demo", "--messages", "500"], cwd=outside, env=env)
    assert "each exactly once" in demo.stdout, demo.stdout
