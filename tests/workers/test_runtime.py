"""Process settings for compute processes: passive OpenMP waits and a malloc that reuses freed blocks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_configure_sets_passive_waits_and_malloc_reuse_before_torch() -> None:
    code = (
        "import sys\n"
        "from workers import runtime\n"
        "assert 'torch' not in sys.modules, 'workers.runtime must not import torch'\n"
        "ok = runtime.configure()\n"
        "import os\n"
        "print(ok, os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "PASSIVE"]


def test_configure_keeps_an_explicit_wait_policy() -> None:
    code = "from workers import runtime\nruntime.configure()\nimport os\nprint(os.environ['OMP_WAIT_POLICY'])\n"
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "ACTIVE"
