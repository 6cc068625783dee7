"""`callbacks/` and `envs/` import as `dplightning.callbacks` / `dplightning.envs`: editable and from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_top_level_folders() -> None:
    import dplightning.callbacks
    import dplightning.envs

    assert Path(dplightning.callbacks.__file__).resolve() == ROOT / "callbacks" / "__init__.py"
    assert Path(dplightning.envs.__file__).resolve() == ROOT / "envs" / "__init__.py"
    from dplightning.callbacks import PrivacyBudget  # noqa: F401


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "dplightning"
    assert exe.exists()
    out = subprocess.run([str(exe), "privacy", "epsilon", "--sigma", "1", "--sample-rate", "0.01", "--steps", "10",
                          "--delta", "1e-5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().split()[-1]) > 0


@pytest.mark.slow
def test_wheel_imports_from_outside_the_repo(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(wheel_dir.glob("dplightning-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # a fresh venv: nothing of this repo in it
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import dplightning, dplightning.callbacks, dplightning.envs, dplightning.strategies;"
        "from dplightning.callbacks import PrivacyBudget;"
        "print(dplightning.__file__); print(dplightning.callbacks.__file__); print(dplightning.envs.__file__)"
    )
    # Dependencies (torch, lightning, ...) come from this interpreter's site-packages via PYTHONPATH, which
    # Python does not scan for .pth files: the editable install's import finder stays out of the picture.
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": deps}
    out = subprocess.run([str(py), "-c", code], cwd=outside, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert all(f.startswith(site) for f in files), files
    assert files[1].endswith("dplightning/callbacks/__init__.py")
    assert files[2].endswith("dplightning/envs/__init__.py")
