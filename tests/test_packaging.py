"""kernels/ must install as sami_fast.kernels, never as a top-level `kernels` package."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_exposes_kernels_subpackage():
    import sami_fast.kernels

    assert Path(sami_fast.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_wheel_install_puts_kernels_under_sami_fast(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path,
    )
    assert (target / "sami_fast" / "kernels" / "__init__.py").is_file()
    assert (target / "sami_fast" / "bench" / "__init__.py").is_file()
    assert not (target / "kernels").exists(), "a top-level `kernels` package would shadow PyPI's `kernels`"
    # Import from the installed copy only (not the source tree) in a clean interpreter.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run(
        [sys.executable, "-c", "import sami_fast.kernels, sami_fast; print(sami_fast.kernels.__file__)"],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True,
    ).stdout
    assert out.strip().startswith(str(target))
