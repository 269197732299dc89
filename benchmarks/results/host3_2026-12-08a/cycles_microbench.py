import torch, numba, numpy as np, time
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.nm.mask import nm_mask
torch.manual_seed(0)
numba.set_num_threads(1); torch.set_num_threads(1)
for dt in (torch.float32, torch.bfloat16):
  for O,K,B in [(64,4096,1),(128,4096,1),(64,4096,4),(32,4096,8)]:
    w = torch.randn(O, K); w = (w * nm_mask(w.abs(), 2, 4)).to(dt)
    t = NMTensor.from_dense(w, 2, 4)
    x = torch.randn(B, K)
    a = nk._select(t, "perm"); vals, idx = a[1]; xprep = a[5] if len(a) > 5 else None
    par, ser = nk._compiled()["perm"]
    xv = np.empty(K*B, np.float32)
    if xprep is not None: xprep(x.numpy(), K//32, B*32, xv)
    else: xv[:] = x.reshape(B, K//32, 32).transpose(0,1).reshape(-1).numpy()
    y = np.empty(B*O, np.float32); xt = np.zeros(0, np.float32)
    ser(vals, idx, xv, xt, y, O, K, B, xt)
    assert np.allclose(y.reshape(B,O), (x @ w.float().T).numpy(), atol=1e-2, rtol=1e-3)
    best = 1e9
    for r in range(5):
        t0 = time.perf_counter()
        for _ in range(200): ser(vals, idx, xv, xt, y, O, K, B, xt)
        best = min(best, (time.perf_counter()-t0)/200)
    blocks = O*K/32
    print(f"{str(dt)[6:]} {O}x{K} B={B}: {best*1e6:.1f} us, {best*2.45e9/blocks:.2f} cycles/block, {best*2.45e9/blocks/B:.2f} per block-row", flush=True)
