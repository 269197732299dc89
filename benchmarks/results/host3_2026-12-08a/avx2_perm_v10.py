"""AVX2 "perm" (KERNELS_VERSION 10) vs F.linear, and SparseLinear vs nn.Linear, paired, 2 threads.
Run: python avx2_perm_v10.py > avx2_perm_v10.txt (nothing else running)."""
import json, sys, time, torch, torch.nn as nn, torch.nn.functional as F
from sparsewise.bench import compare
from sparsewise.advisor.probe import ReadMeter
from sparsewise.nm import kernels as nk
from sparsewise.nm.linear import SparseLinear, crossover_batch
from sparsewise.nm.tensor import NMTensor
from sparsewise.nm.mask import nm_mask

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference, as a decode loop runs (both sides)
meter = ReadMeter(2)
shapes = [(11008, 4096), (4096, 11008), (4096, 4096), (1536, 576), (576, 1536), (576, 576)]
rows = []
for dt in (torch.float32, torch.bfloat16):
    for O, K in shapes:
        lin = nn.Linear(K, O, bias=False)
        with torch.no_grad():
            lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
        lin = lin.to(dt)
        w = lin.weight.detach()
        t = NMTensor.from_dense(w, 2, 4)
        sl = SparseLinear.from_dense(lin, 2, 4)
        cross = crossover_batch(t)
        for B in (1, 8, 32):
            if dt == torch.bfloat16 and B == 32 and O * K > 20e6:
                continue  # torch's bf16 GEMM here: ~1.2 GFLOP/s, seconds a call
            x = torch.randn(B, K)
            xd = x.to(dt)
            bw = meter.gbs()
            r = compare(lambda: nk.nm_matmul(x, t, kernel="perm"), lambda: F.linear(xd, w), pairs=7)
            s = compare(lambda: sl(xd), lambda: lin(xd), pairs=7)
            nbytes = t.values.numel() * t.values.element_size() + t.indices.numel()
            row = dict(dtype=str(dt)[6:], shape=f"{O}x{K}", batch=B, perm_vs_dense=round(r.ratio, 3),
                       sparselinear_vs_linear=round(s.ratio, 3), crossover=cross,
                       perm_pct_read_bw=round(100 * nbytes / r.candidate_s / 1e9 / bw, 1) if B == 1 else None,
                       read_gbs=round(bw, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1] if len(sys.argv) > 1 else "avx2_perm_v10.json", "w"), indent=1)
