import re
from pathlib import Path

from setuptools import setup

# The version is defined once, in sami_fast/__init__.py (read as text: importing needs torch).
INIT = Path(__file__).parent / "sami_fast" / "__init__.py"
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT.read_text(encoding="utf-8"), re.M).group(1)

# `kernels/` (Triton kernels only) ships as the subpackage `sami_fast.kernels`:
# a top-level package named `kernels` would shadow an unrelated PyPI package
# that transformers probes for.
setup(
    name="sami_fast",
    version=VERSION,
    description="Fused Triton kernels and a shared-prefix trainer for SAMI "
    "(Self-Supervised Alignment with Mutual Information)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sami_fast", "sami_fast.kernels"],
    package_dir={"sami_fast": "sami_fast", "sami_fast.kernels": "kernels"},
    # The embedded example dataset (queries and principle files) that `sami_fast.data` points to.
    package_data={"sami_fast": ["datasets/*.jsonl", "datasets/principles/*.json"]},
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "setuptools>=70.1", "ruff>=0.6"],
        "hf": ["transformers>=4.57", "accelerate", "gguf"],
        # `sami-fast train`: YAML configs, progress bars, the training plot.
        "train": ["transformers>=4.57", "accelerate", "gguf", "pyyaml", "tqdm", "matplotlib"],
        "flash": ["flash-attn>=2.6"],
        # The fused linear cross-entropies the benchmarks compare against (cut-cross-entropy's
        # torch_compile implementation runs on CPU too; its Triton kernels and Liger need CUDA).
        "peers": ["cut-cross-entropy", "liger-kernel"],
    },
    entry_points={"console_scripts": ["sami-fast=sami_fast.cli:main"]},
)
