"""The Triton kernels compile for an H100 (sm_90) with the real backend, no GPU needed.

The interpreter runs kernel semantics but not Triton's compiler; this catches
what only the compiler rejects, and checks that the dense paths use 128-bit
loads and stores once a launch has specialised on 16-byte-aligned pointers and
sizes divisible by 16 (what Triton does for such arguments). It runs in a
subprocess because this process has TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastres.kernels import add_relu as k

ALIGNED = [["tt.divisibility", 16]]


def compile_ops(kernel, types, constexprs):
    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in kernel.arg_names}
    attrs = {(i,): ALIGNED for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr") or name == "n_elements"}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))


out = {}
for dtype in ("fp32", "bf16"):
    for dense in (True, False):
        out[f"fwd {dtype} dense={dense}"] = compile_ops(
            k._add_relu_fwd_kernel,
            {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "mask_ptr": "*u8"},
            {"X_DENSE": dense, "R_DENSE": dense, "Z_DENSE": True, "WRITE_MASK": True, "FP64": False, "BLOCK": 2048},
        )
        out[f"bwd {dtype} dense={dense}"] = compile_ops(
            k._add_relu_bwd_kernel,
            {"dz_ptr": f"*{dtype}", "mask_ptr": "*u8", "dx_ptr": f"*{dtype}"},
            {"DZ_DENSE": dense, "BLOCK": 2048},
        )
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90_memory_ops():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_compiles(sm90_memory_ops):
    assert len(sm90_memory_ops) == 8


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dense_paths_move_128_bits_per_access(sm90_memory_ops, kernel, dtype):
    ops = sm90_memory_ops[f"{kernel} {dtype} dense=True"]
    assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, ops
