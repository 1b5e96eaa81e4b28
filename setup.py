"""Packaging of xclip-fast. All metadata lives here; pyproject.toml only names the build backend
and configures the tools (ruff, pytest)."""

from pathlib import Path

from setuptools import setup

README = Path(__file__).with_name("README.md")

setup(
    name="xclip-fast",
    version="0.1.0",
    description="Triton kernels and drop-in PyTorch modules for a fast, lean X-CLIP video encoder",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",  # as torch 2.11
    # the kernels live in xclip_fast/kernels/ (kernels only, no PyTorch modules), not in a top-level
    # kernels/ folder: that name is a PyPI package which transformers imports, and a checkout's folder
    # would shadow it wherever the repository root is on sys.path (python -m pytest, python -c).
    packages=["xclip_fast", "xclip_fast.bench", "xclip_fast.extract", "xclip_fast.kernels"],
    # the tuned tile sizes that launch_plan reads (kernels/tuning.py)
    package_data={"xclip_fast": ["auto_table.json"], "xclip_fast.kernels": ["tuned.json"]},
    # The supported range is what CI runs the test suite on (xclip_fast/versions.py, .ci/run): torch 2.11
    # with its triton 3.6 (the oldest pair) and the newest releases. No upper bound: newer releases are
    # allowed (capping torch would make pip downgrade it), older ones are refused here and at import.
    install_requires=[
        "torch>=2.11",
        "numpy",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # the tests also run the benchmark runner (plot), write/read real videos (progress bar),
        # fine-tune with PEFT LoRA and transformers' Trainer (accelerate), and export to ONNX and run it in
        # ONNX Runtime
        "test": ["pytest>=7", "transformers>=5", "safetensors", "av>=11", "matplotlib", "tqdm", "peft", "accelerate",
                 "onnx", "onnxscript", "onnxruntime"],
        # ONNX export (the dynamo exporter needs onnx and onnxscript) and ONNX Runtime for the bench;
        # the .pt2 package needs nothing beyond torch
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # xformers wheels pin exact torch versions: opt in explicitly
        "xformers": ["xformers"],
        "video": ["av>=11", "tqdm"],
        "dev": ["ruff"],
    },
    entry_points={"console_scripts": ["xclip-fast=xclip_fast.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
