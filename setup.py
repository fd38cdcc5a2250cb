"""Build fastar: setuptools hands the extensions to CMake + Ninja (CMakeLists.txt says what is compiled).

Environment:
  MAX_JOBS              parallel compile jobs (default: number of CPUs)
  FASTAR_TARGET_DEVICE  auto (default) | cpu | cuda. auto builds the CUDA kernels when torch is a CUDA
                        build and nvcc is found.
  FASTAR_CUDA_ARCHS     e.g. "8.0;9.0". Default: the archs of the visible GPUs, else "8.0;9.0".
  FASTAR_BUILD_SIMT     1: also build fastar._C_simt, the test-only SIMT emulation of the CUDA kernels
                        (needs only the CUDA headers, no GPU).
  FASTAR_SANITIZE       1: build with AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernels only, with
                        FASTAR_TARGET_DEVICE=cpu; in its own CMake build folder). .ci/sanitize runs the tests so.
  CUDA_HOME             the CUDA toolkit root, if it cannot be found from nvcc.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _is_toolkit_root(path):
    return path is not None and (Path(path) / "include" / "cuda_fp16.h").is_file()


def find_cuda_home():
    """The toolkit root that holds include/cuda_fp16.h.

    The nvcc on PATH may be a wrapper script in another prefix than the toolkit (so torch's guess from its
    location is wrong); nvcc's own dry run names the real root in its TOP= line.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return str(Path(os.environ[var]).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
            if m:
                top = Path(m.group(1).strip()).resolve()
                for cand in (top, top.parent):
                    if _is_toolkit_root(cand):
                        return str(cand)
        except (OSError, subprocess.SubprocessError):
            pass
        cand = Path(nvcc).resolve().parent.parent
        if _is_toolkit_root(cand):
            return str(cand)
    if _is_toolkit_root("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def cuda_include_dirs(cuda_home):
    """Headers for the SIMT build and the CUDA glue: the toolkit's, else the nvidia wheel's."""
    dirs = []
    if cuda_home:
        dirs.append(os.path.join(cuda_home, "include"))
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13/include", "cuda_runtime/include"):
                if (Path(base) / sub / "cuda_fp16.h").is_file():
                    dirs.append(str(Path(base) / sub))
    except ImportError:
        pass
    return dirs


def default_cuda_archs():
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # a broken driver must not break a CPU build
        pass
    return "8.0;9.0"


def cmake_executable():
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake") or "cmake"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


NO_TORCH_MESSAGE = (
    "fastar: torch cannot be imported in the build environment. fastar's kernels must be compiled against the "
    "torch they will run with, so build it in the environment that has that torch, without build isolation:\n"
    "    pip install --no-build-isolation .\n"
    "(plain `pip install .` builds in an isolated environment, which has no torch)."
)


def require_torch():
    """Stop the build with NO_TORCH_MESSAGE unless torch is importable (before CMake runs)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(NO_TORCH_MESSAGE)


class cmake_build_ext(build_ext):
    """Configure CMake once and build every extension target with Ninja (vLLM's pattern)."""

    def build_extensions(self):
        require_torch()
        cuda_home = find_cuda_home()
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).parent.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        sanitize = os.environ.get("FASTAR_SANITIZE", "0") == "1"
        suffix = "-sanitize" if sanitize else ""  # its own folder: switching does not rebuild the normal build
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}{suffix}"
        build_dir.mkdir(parents=True, exist_ok=True)
        device = os.environ.get("FASTAR_TARGET_DEVICE", "auto")
        inc = cuda_include_dirs(cuda_home)
        build_simt = os.environ.get("FASTAR_BUILD_SIMT", "0") == "1" and bool(inc)
        if os.environ.get("FASTAR_BUILD_SIMT", "0") == "1" and not inc:
            print("fastar: FASTAR_BUILD_SIMT=1 but no CUDA headers (cuda_fp16.h) found; skipping _C_simt")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTAR_TARGET_DEVICE={device}",
            f"-DFASTAR_CUDA_ARCHS={os.environ.get('FASTAR_CUDA_ARCHS') or default_cuda_archs()}",
            f"-DFASTAR_CUDA_HOME={cuda_home or ''}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home or ''}",
            f"-DFASTAR_CUDA_INCLUDE_DIRS={';'.join(inc)}",
            f"-DFASTAR_BUILD_SIMT={'ON' if build_simt else 'OFF'}",
            f"-DFASTAR_OUTPUT_DIR={out_dir}",
            f"-DFASTAR_SANITIZE={'ON' if sanitize else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-GNinja",
        ]
        env = dict(os.environ)
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
        cmake = cmake_executable()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True, env=env)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True, env=env)


ext_modules = [CMakeExtension("fastar._C")]
if os.environ.get("FASTAR_BUILD_SIMT", "0") == "1":
    ext_modules.append(CMakeExtension("fastar._C_simt"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": cmake_build_ext})
