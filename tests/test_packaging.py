"""kernels/ must install as sami_fast.kernels, never as a top-level `kernels` package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from sami_fast.data import EMBEDDED_PRINCIPLES

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_exposes_kernels_subpackage():
    import sami_fast.kernels

    assert Path(sami_fast.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


def test_wheel_install_puts_kernels_under_sami_fast(tmp_path):
    # Build from a copy without earlier build outputs: a stale build/lib would ship files setup.py no longer names.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, cwd=tmp_path,
    )
    assert (target / "sami_fast" / "kernels" / "__init__.py").is_file()
    # The benchmarks belong to the source checkout: `sami-fast bench` of an install says where they are.
    assert not (target / "sami_fast" / "bench").exists() and not (target / "benchmarks").exists()
    assert not (target / "kernels").exists(), "a top-level `kernels` package would shadow PyPI's `kernels`"
    # Import from the installed copy only (not the source tree) in a clean interpreter.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run(
        [sys.executable, "-c", "import sami_fast.kernels, sami_fast.data as data; print(sami_fast.kernels.__file__); "
         "print(data.embedded_queries_path()); print(len(data.load_queries(data.embedded_queries_path()))); "
         "from sami_fast.cli import main; print(main(['bench']))"],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True,
    )
    assert "python -m benchmarks" in out.stderr
    kernels_file, queries_file, query_count, bench_status = out.stdout.splitlines()
    assert bench_status == "2"
    assert kernels_file.startswith(str(target))
    # The embedded example dataset ships as package data and loads from the installed copy.
    assert queries_file.startswith(str(target)) and int(query_count) > 0
    datasets = target / "sami_fast" / "datasets"
    shipped = {path.relative_to(datasets).as_posix() for path in datasets.rglob("*") if path.is_file()}
    assert shipped == {"queries.jsonl"} | {f"principles/{name}.json" for name in EMBEDDED_PRINCIPLES}
