import sys, torch, torch.nn.functional as F
from sparsewise.bench import compare
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.nm.mask import nm_mask
torch.manual_seed(0)
shapes = [(11008, 4096), (4096, 4096), (1536, 576)]
for dt in (torch.float32, torch.bfloat16):
    for O, K in shapes:
        w = torch.randn(O, K); w = (w * nm_mask(w.abs(), 2, 4)).to(dt)
        t = NMTensor.from_dense(w, 2, 4)
        for B in [int(b) for b in sys.argv[1:]] or (1, 8):
            x = torch.randn(B, K); xd = x.to(dt)
            r = compare(lambda: nk.nm_matmul(x, t, kernel="perm"), lambda: F.linear(xd, w), pairs=7)
            g = compare(lambda: nk.nm_matmul(x, t, kernel="generic"), lambda: F.linear(xd, w), pairs=3) if (O*K < 5e7 and B == 1) else None
            print(f"{str(dt)[6:]:9s} {O}x{K} B={B}: perm {r.ratio:.2f}x dense" + (f", generic {g.ratio:.2f}x" if g else ""), flush=True)
