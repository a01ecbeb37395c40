"""GPU-only code paths must at least compile for Hopper: the interpreter never compiles them.

The Triton kernels go through Triton's whole pipeline to PTX (``--to ptx``: ptxas, a third
of a cold run's time, assembles Triton's own output); the Gluon kernels, with inline PTX,
are assembled to cubin.  ``python tools/compile_check_sm90.py`` assembles everything."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The tool's variants in this many shards (every SHARDS-th variant each), one test per
#: shard, so that pytest-xdist spreads the ptxas builds over its workers.
SHARDS = 6


@pytest.mark.parametrize("shard", range(SHARDS), ids=lambda i: f"shard{i}of{SHARDS}")
def test_gpu_kernel_variants_compile_for_sm90(shard):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_check_sm90.py"),
                        "--shard", f"{shard}/{SHARDS}", "--to", "ptx"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    done = re.search(r"compiled (\d+) kernel variants for sm_90 .*shard (\d+)/(\d+)", r.stdout)
    assert done and int(done[1]) > 0 and done.group(2, 3) == (str(shard), str(SHARDS)), r.stdout[-2000:]
