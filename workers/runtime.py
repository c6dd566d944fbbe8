"""Process-wide settings for a process that runs merge or unlearning compute (a worker, a benchmark child).

Call `configure()` before torch is imported (this module does not import it):

- OpenMP threads wait passively: threads that spin while waiting make torch several times slower whenever
  the cores are shared (measured 4-6× on 2 cores). The price is paid by LAPACK on small matrices (many
  short parallel regions, each waking a sleeping thread: a batched 128×128 eigh 7× slower on two threads
  than on one), so those run on one-thread workers side by side (`workers/engines/linalg_pool.py`).
- glibc malloc keeps freed blocks for reuse (blocks up to 32 MiB come from the heap, and up to 256 MiB of
  freed heap stays mapped). A merge streams batches of modules whose buffers have the same sizes batch
  after batch; without this each batch gets fresh pages from the kernel, and first-touch page faults cost
  as much as reading the adapters (T=8 Llama-7B-shaped merge_then_compress: 2.6 s -> 2.1 s, page faults
  250k -> 190k, measured here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 256 * 2**20


def configure() -> bool:
    """Apply the settings above to this process; returns whether malloc accepted them (False off glibc)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch.cuda.is_available() asks NVML instead of creating a CUDA context: a prefork parent that created
    # one would leave its children unable to use the GPU
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
