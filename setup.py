"""Build script for torch_dpfast.

Builds two optional extension modules:

* ``torch_dpfast._C``      C++ CPU kernels and the schemas of the private ``dpfast_C`` op library
  (always attempted);
* ``torch_dpfast._C_cuda`` CUDA kernels registered on the CUDA dispatch key of the same ops
  (attempted when a CUDA toolkit matching torch's CUDA version is found).

Environment switches:

* ``TORCH_DPFAST_BUILD_CPP=0``        skip both extensions (pure-PyTorch install);
* ``TORCH_DPFAST_BUILD_CUDA=0|1``     force the CUDA extension off / on (default: auto-detect);
* ``TORCH_DPFAST_STRICT_BUILD=1``     a failed extension build fails the install (CI uses this);
* ``CUDA_HOME`` / ``CUDA_PATH``       the toolkit; falls back to ``/usr/local/cuda``;
* ``TORCH_CUDA_ARCH_LIST``            default ``8.0;9.0`` (A100, H100/H200) plus PTX for newer.

Without any compiled extension the package still installs and runs on its references.
Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch.
"""

import glob
import os
import sys

from setuptools import setup


def _env_flag(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    return "auto"


def _find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH if set, else /usr/local/cuda; None when no nvcc is there."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def _log(msg: str) -> None:
    print(f"torch_dpfast setup: {msg}", file=sys.stderr)


BUILD_CPP = _env_flag("TORCH_DPFAST_BUILD_CPP", "on") != "off"
BUILD_CUDA = _env_flag("TORCH_DPFAST_BUILD_CUDA")
STRICT = _env_flag("TORCH_DPFAST_STRICT_BUILD", "off") == "on"

# torch's cpp_extension fixes CUDA_HOME when it is imported (guessing from `which nvcc`, which may
# be a wrapper), so the toolkit location has to be settled before that import.
CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")


def _extensions_and_cmdclass():
    if not BUILD_CPP:
        _log("TORCH_DPFAST_BUILD_CPP=0: installing the pure-PyTorch package only")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        if STRICT:
            raise
        _log(f"torch is not importable ({err}); installing without compiled extensions")
        return [], {}

    root = os.path.dirname(os.path.abspath(__file__))
    include = [os.path.join(root, "csrc")]
    # As torch's own build: sqrt without an errno branch, and loops with conditional float
    # arithmetic if-converted (no floating-point traps are relied on): the loops vectorise.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    ext_modules = [
        cpp_extension.CppExtension(
            "torch_dpfast._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=include,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]

    want_cuda = BUILD_CUDA == "on" or (BUILD_CUDA == "auto" and CUDA_HOME and torch.version.cuda)
    if want_cuda:
        if not CUDA_HOME or not torch.version.cuda:
            msg = (
                f"CUDA build requested but toolkit={CUDA_HOME!r}, torch CUDA={torch.version.cuda!r}"
            )
            if STRICT:
                raise RuntimeError(msg)
            _log(msg + "; skipping _C_cuda")
        else:
            cpp_extension.CUDA_HOME = CUDA_HOME
            _log(
                f"building _C_cuda with the toolkit at {CUDA_HOME} for torch CUDA "
                f"{torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
            )
            ext_modules.append(
                cpp_extension.CUDAExtension(
                    "torch_dpfast._C_cuda",
                    sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                    include_dirs=include,
                    # No --use_fast_math: clip factors need IEEE sqrt and division for ||c g|| <= C.
                    extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                )
            )
    else:
        _log("no CUDA toolkit matching torch found; building the CPU extension only")

    class BuildExtension(cpp_extension.BuildExtension):
        """Drops an extension that fails to build (unless strict) instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                if STRICT:
                    raise
                _log(f"building {ext.name} failed ({err}); the package will use its references")

    return ext_modules, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
