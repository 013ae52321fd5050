"""Packaging for xclip-kernels: the pure-Python packages ``xclip_kernels`` and ``xclip``."""

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    with open("requirements.txt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    runtime = ("torch", "numpy", "safetensors", "instant-clip-tokenizer")
    # Loose lower bounds for users; the exact pins are for our own venv (requirements.txt).
    return [line.replace("==", ">=") for line in lines if line.split("==")[0] in runtime]


setup(
    name="xclip-kernels",
    version="0.1.0",
    description="Fused attention kernels and a drop-in model for X-CLIP video recognition",
    packages=find_packages(include=["xclip_kernels", "xclip_kernels.*", "xclip", "xclip.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={"triton": ["triton"], "test": ["pytest", "transformers"]},
)
