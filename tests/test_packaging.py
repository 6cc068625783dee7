"""`callbacks/` and `envs/` import as `dplightning.callbacks` / `dplightning.envs`: editable and from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import PRIVACY_EPSILON, run_dplightning

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
    out = run_dplightning(PRIVACY_EPSILON, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().split()[-1]) > 0


@pytest.mark.slow
def test_wheel_imports_from_outside_the_repo(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("dplightning-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # a fresh venv: nothing of this repo in it
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import dplightning, dplightning.callbacks, dplightning.envs, dplightning.strategies;"
        "from dplightning.callbacks import PrivacyBudget;"
        "print(dplightning.__file__); print(dplightning.callbacks.__file__); print(dplightning.envs.__file__)"
    )
    # Dependencies (torch, lightning, ...) come from this interpreter's site-packages via PYTHONPATH, which
    # Python does not scan for .pth files: the editable install's import finder stays out of the picture.
    deps = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {**os.environ, "PYTHONPATH": deps}
    out = subprocess.run(
        [str(py), "-c", code], cwd=outside, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert all(f.startswith(site) for f in files), files
    assert files[1].endswith("dplightning/callbacks/__init__.py")
    assert files[2].endswith("dplightning/envs/__init__.py")


# --- the public API is lazy -------------------------------------------------------------------------------

LAZY_PACKAGES = ("dplightning", "dplightning.callbacks", "dplightning.envs", "dplightning.privacy")


def _modules_after(code: str) -> set[str]:
    """The top-level names in sys.modules after running ``code`` in a fresh interpreter (nothing imported by
    this test session leaks in)."""
    script = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


def test_import_dplightning_loads_no_heavy_stack() -> None:
    loaded = _modules_after("import dplightning; dplightning.__version__")
    assert not loaded & {
        "torch",
        "lightning",
        "transformers",
        "peft",
        "stable_baselines3",
        "gymnasium",
        "dp_accounting",
        "numpy",
    }, loaded


def test_privacy_budget_does_not_load_rl_stacks() -> None:
    loaded = _modules_after("from dplightning.callbacks import PrivacyBudget")
    assert "stable_baselines3" not in loaded
    assert "gymnasium" not in loaded


def test_accounting_exports_do_not_load_torch() -> None:
    loaded = _modules_after(
        "from dplightning.privacy import compute_epsilon\nassert compute_epsilon(1.0, 0.01, 10, 1e-5) > 0"
    )
    assert "dp_accounting" in loaded
    assert not loaded & {"torch", "lightning"}, loaded


def test_envs_register_the_environment_without_importing_it() -> None:
    code = (
        "import sys, gymnasium as gym, dplightning.envs\n"
        "assert 'dplightning/DPTraining-v0' in gym.registry\n"
        "assert 'dplightning.envs.dp_training_env' not in sys.modules\n"
        "assert dplightning.envs.DPTrainingEnv is sys.modules['dplightning.envs.dp_training_env'].DPTrainingEnv\n"
        "assert gym.spec('dplightning/DPTraining-v0').entry_point == 'dplightning.envs.dp_training_env:DPTrainingEnv'"
    )
    assert "stable_baselines3" not in _modules_after(code)


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_all_matches_the_lazy_exports_and_every_name_resolves(name: str) -> None:
    import importlib

    package = importlib.import_module(name)
    exported = set(package._EXPORTS)
    assert set(package.__all__) - exported <= {"__version__", "ENV_ID"}
    assert exported <= set(package.__all__)
    assert len(package.__all__) == len(set(package.__all__))
    for attr in package.__all__:
        value = getattr(package, attr)
        assert value is not None, attr
        if attr in exported:  # the same object as in its defining module, not a copy
            home = importlib.import_module(f"{name}.{package._EXPORTS[attr]}")
            assert value is getattr(home, attr)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_top_level_names_are_the_documented_classes() -> None:
    import dplightning
    from dplightning.callbacks.privacy_budget import PrivacyBudget
    from dplightning.module import DPLoRAModule
    from dplightning.privacy.accounting import compute_epsilon, make_accountant, noise_for_target
    from dplightning.strategies.dpsgd import DDPDPSGDStrategy, DPSGDStrategy
    from dplightning.strategies.dpzo import DPZOStrategy

    assert dplightning.DPLoRAModule is DPLoRAModule
    assert dplightning.DPSGDStrategy is DPSGDStrategy
    assert dplightning.DDPDPSGDStrategy is DDPDPSGDStrategy
    assert dplightning.DPZOStrategy is DPZOStrategy
    assert dplightning.PrivacyBudget is PrivacyBudget
    assert dplightning.privacy.compute_epsilon is compute_epsilon
    assert dplightning.privacy.make_accountant is make_accountant
    assert dplightning.privacy.noise_for_target is noise_for_target
    from dplightning import DPLoRAModule as again  # `from` imports go through the same module __getattr__

    assert again is DPLoRAModule
