"""Builds the native datapath extension; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "resilient_moe._native",
            sources=["csrc/native.c", "csrc/crc32c.c", "csrc/shmring.c"],
            include_dirs=["csrc"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "resilient_moe._kernels",
            sources=["csrc/kernels.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
