"""The shared-prefix tests again under transformers 4.57 (the venv has 5.x).

.ci/setup installs transformers 4.57.1 with its hub and tokenizers into
.venv/transformers-4.57; this runs tests/test_hf.py in a subprocess with that
directory first on the path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS_4 = ROOT / ".venv" / "transformers-4.57"


@pytest.mark.skipif(not TRANSFORMERS_4.is_dir(), reason="run .ci/setup to install transformers 4.57 beside the venv")
def test_shared_prefix_suite_under_transformers_4_57():
    path = [str(TRANSFORMERS_4)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert version == "4.57.1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_hf.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
