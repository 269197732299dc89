import time, torch, numba, torch.nn.functional as F
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.bench import compare
torch.manual_seed(0); torch.set_grad_enabled(False)
print(numba.config.THREADING_LAYER, torch.get_num_threads(), numba.get_num_threads())
O,K=11008,4096
for dt in (torch.float32, torch.bfloat16):
    ts=[NMTensor.from_dense(torch.randn(O,K).to(dt),2,4) for _ in range(2)]
    ds=[t.to_dense() for t in ts]
    x=torch.randn(1,K); xd=x.to(dt)
    i=[0]; j=[0]
    def kc():
        i[0]+=1; return nk.nm_matmul(x,ts[i[0]%2])
    def dc():
        j[0]+=1; return F.linear(xd,ds[j[0]%2])
    r=compare(kc,dc,pairs=5)
    print(str(dt)[6:], "paired", f"kernel {r.candidate_s*1e3:.3f} dense {r.baseline_s*1e3:.3f} ratio {r.ratio:.2f}")
    best=1e9
    for rep in range(5):
        t0=time.perf_counter()
        for _ in range(10): kc()
        best=min(best,(time.perf_counter()-t0)/10)
    print(" alone kernel", f"{best*1e3:.3f}")
    dc(); t0=time.perf_counter(); kc(); print(" kernel right after dense", f"{(time.perf_counter()-t0)*1e3:.3f}")
    dc(); time.sleep(0.01); t0=time.perf_counter(); kc(); print(" kernel 10ms after dense", f"{(time.perf_counter()-t0)*1e3:.3f}")
    dc(); time.sleep(0.3); t0=time.perf_counter(); kc(); print(" kernel 300ms after dense", f"{(time.perf_counter()-t0)*1e3:.3f}")
