"""GPU-readiness of the operators' torch.compile path without a GPU: their triton_op bodies trace
with fake CUDA tensors and decompose into the kernels Inductor schedules (tests/triton_op_trace.py,
run without TRITON_INTERPRET)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed on this platform")
SCRIPT = Path(__file__).with_name("triton_op_trace.py")
# kernels per operator: the forward; the forward and the backward (the traces' frame attention: 4 frames x 12
# heads under the 132 SMs planned for without a GPU, so the key chunks are split and a second launch sums dq;
# the message attention at T = 8: the packed forward, then its delta, dk/dv and dq passes)
KERNELS = {"packed_attention_fwd": 1, "packed_attention_bwd": 3, "attention_fwd": 1, "attention_bwd": 3,
           "attention_bwd-messages": 4,
           "quick_gelu": 1, "quick_gelu_backward": 1}


# what the kernels write: outputs, gradients, the backward's own buffers
WRITTEN = {"o", "lse", "delta", "dq", "dk", "dv", "dek", "dev", "work_dq", "work_delta", "y", "dx"}


def test_every_operator_traces_into_its_kernels():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XCLIP_FAST_OPAQUE_OPS")}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
    rows = {r["op"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines() if line.startswith("{")))}
    assert proc.returncode == 0 and set(rows) == set(KERNELS), proc.stdout[-3000:] + proc.stderr[-3000:]
    for op, n in KERNELS.items():
        assert rows[op]["kernels"] == n, rows[op]
        # each kernel node clones only buffers the kernel writes: PyTorch's analysis of its Triton IR
        # worked (where it fails, every input is cloned, a copy of q, k, v, dO... per call; it did for
        # the packed backward while its compiled name did not contain its function's name)
        cloned = {name for clones in rows[op]["clones"] for name in clones}
        assert cloned <= WRITTEN, (op, sorted(cloned - WRITTEN))
    # the modules' layout survives: a seq-first qkv gives a seq-first output and a seq-first dqkv
    (out_shape, out_stride), _ = rows["packed_attention_fwd"]["layouts"]
    assert out_shape == [4, 197, 12, 64] and out_stride == [768, 3072, 64, 1]
    assert rows["packed_attention_bwd"]["layouts"][0][1] == [2304, 9216, 768, 64, 1]
