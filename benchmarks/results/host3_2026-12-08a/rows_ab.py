import torch, torch.nn.functional as F, sys
from sparsewise.bench import compare
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.nm.mask import nm_mask
torch.manual_seed(0); torch.set_grad_enabled(False)
out = []
for dt in (torch.bfloat16, torch.float32):
  for O,K in [(11008,4096),(4096,11008)]:
    w = torch.randn(O, K); w = (w * nm_mask(w.abs(), 2, 4)).to(dt)
    t = NMTensor.from_dense(w, 2, 4); x = torch.randn(1, K); xd = x.to(dt)
    r = compare(lambda: nk.nm_matmul(x, t, kernel="perm"), lambda: F.linear(xd, w), pairs=9)
    out.append(f"{str(dt)[6:]} {O}x{K} {r.ratio:.2f} ({r.candidate_s*1e3:.2f} ms)")
print(sys.argv[1], " | ".join(out), flush=True)
