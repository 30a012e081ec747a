"""The project's C kernels, compiled at first use for the CPU they run on and called through ctypes.

depthwise_conv.c (the depthwise convolution's gradients, for depthwise_conv.py) and batch_norm.c (training batch
norm by groups of clips, for batch_norm.py) are built together, once per process, with the system's C compiler ($CC,
else cc), `-march=native` and `-fopenmp` into a temporary folder (a fraction of a second), and loaded from there.
Their threads are OpenMP's (parallel.h): the library needs libgomp.so.1, which the process has already loaded from
PyTorch's own lib folder, so the kernels run on the threads ATen's kernels run on. A PyTorch built on another OpenMP
runtime (Intel's or LLVM's, as some conda builds are) would get a second runtime with the library, and a second pool
of threads on the same cores: a warning then says so. Without a compiler, or where the build fails, `library()` is
None after one warning that names the compiler, and the callers run their PyTorch paths (slower): nothing else needs
a compiler. The kernels compute float32 only.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = ("depthwise_conv.c", "batch_norm.c")
_POINTER, _SIZE, _INT, _DOUBLE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
SIGNATURES = {  # argument types of each function; all return 0, or -1 out of memory
    "depthwise_weight_grad": [_POINTER] * 3 + [_SIZE] * 8 + [_INT] * 10,
    "depthwise_input_grad": [_POINTER] * 3 + [_SIZE] * 8 + [_INT] * 10,
    "batch_norm_forward": [_POINTER] * 8 + [_SIZE, _SIZE, _INT, _DOUBLE, _DOUBLE, _INT],
    "batch_norm_backward": [_POINTER] * 8 + [_SIZE, _SIZE, _INT, _INT],
}

enabled = True  # False: never the C kernels (the PyTorch paths, as without a C compiler)
_OPENMP_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)\b[^/]*\.so[^/]*$")  # GCC's, Intel's and LLVM's


def library_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels where they are enabled and built and the tensors are float32 CPU tensors, else None."""
    if enabled and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return library()
    return None


def call(function: ctypes._CFuncPtr, *args: int | float) -> None:
    """Run one of the kernels; they report only running out of memory."""
    if function(*args) != 0:
        raise MemoryError(f"{function.__name__}: out of memory")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, compiled now for this CPU and loaded; None where they do not build (a warning says so, once)."""
    compiler = os.environ.get("CC") or "cc"
    here = Path(__file__).parent
    command = [compiler, "-O3", "-shared", "-fPIC", *(str(here / name) for name in SOURCES)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "native.so")
        # not every compiler takes -march=native, or has OpenMP
        for flags in (["-fopenmp", "-march=native"], ["-fopenmp"], ["-march=native"], []):
            try:
                result = subprocess.run([*command, *flags, "-o", path, "-lm"], capture_output=True, text=True,
                                        timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                problem = str(error)
                break
            if result.returncode == 0:
                before = openmp_runtimes()
                loaded = ctypes.CDLL(path)  # stays mapped once the file is gone
                added = openmp_runtimes().difference(before)
                if added and before:
                    warnings.warn(f"the C kernels brought in an OpenMP runtime of their own ({', '.join(added)}) "
                                  f"next to PyTorch's ({', '.join(before)}): two thread pools now share the cores, "
                                  "which slows both down", stacklevel=2)
                for name, argtypes in SIGNATURES.items():
                    function = getattr(loaded, name)
                    function.argtypes, function.restype = argtypes, ctypes.c_int
                if "-fopenmp" not in flags:
                    warnings.warn(f"the C kernels built with {compiler!r} without OpenMP: they run on one thread",
                                  stacklevel=2)
                return loaded
            problem = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    warnings.warn(f"the C kernels ({', '.join(SOURCES)}) did not build with {compiler!r} ({problem}); the depthwise "
                  "convolutions' own gradients and training batch norm run in PyTorch, slower", stacklevel=2)
    return None


def openmp_runtimes(maps: str | None = None) -> set[str]:
    """Paths of the OpenMP runtime libraries mapped into this process (`maps`: the text of a /proc/<pid>/maps).

    Empty where /proc is missing (not Linux), so nothing is then checked.
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return set()
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    return {f[5] for f in fields if len(f) == 6 and _OPENMP_RUNTIME.search(f[5])}
