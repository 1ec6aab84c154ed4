"""Every kernel lowers through Triton's real NVIDIA pipeline for Hopper (sm_90), no GPU needed.

The interpreter used by the other tests accepts programs that a GPU compile
rejects; this runs tests/compile_for_hopper.py in a fresh interpreter without
TRITON_INTERPRET (which conftest sets for this process).
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_for_hopper.py")


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for kernel in ("linear_logprobs forward bf16", "linear_logprobs backward bf16", "linear_logprobs forward fp32 tf32",
                   "linear_logprobs backward fp32 tf32", "logits_logprobs forward",
                   "logits_logprobs backward", "mi_loss bf16 BLOCK=64 single_tile=False"):
        assert f"ok    {kernel}" in report, report
    # The small kernels must keep everything in registers at every configuration they launch with.
    for line in report.splitlines():
        if line.startswith(("ok    mi_loss", "ok    logits_logprobs")):
            assert line.endswith(" 0 B spilled"), line
