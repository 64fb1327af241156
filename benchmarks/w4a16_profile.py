"""Launch the W4A16 CUDA kernel a few times at one shape, for a profiler (ncu) to read (GPU).

    ncu --clock-control none --section SpeedOfLight -k regex:w4a16 python benchmarks/w4a16_profile.py 28672 8192 1 8
"""
import sys

import torch
import torch.nn as nn

from lowbit.kernels import w4a16
from lowbit.kernels.primitives import QuantSpec
from lowbit.kernels.wq_gemm import repack
from lowbit.layers import WeightOnlyLinear

N, K, M, split = (int(v) for v in sys.argv[1:5])
torch.manual_seed(0)
lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
lin.weight.normal_(0, 0.02)
pw = repack(WeightOnlyLinear.from_linear(lin, QuantSpec(bits=4, group_size=128), dtype=torch.bfloat16))
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    w4a16.w4a16_linear(x, pw.marlin, split or None)
torch.cuda.synchronize()
print("done", N, K, M, split)
