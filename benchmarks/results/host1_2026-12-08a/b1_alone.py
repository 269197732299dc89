import sys, time, torch, numba
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.advisor.probe import ReadMeter
torch.manual_seed(0)
O,K=11008,4096
for th in (1,2):
    torch.set_num_threads(th); numba.set_num_threads(th)
    m=ReadMeter(th); bw=m.gbs()
    for dt in (torch.float32, torch.bfloat16):
        ts=[NMTensor.from_dense(torch.randn(O,K).to(dt),2,4) for _ in range(2)]
        x=torch.randn(1,K)
        for kern in nk.available_kernels(ts[0]):
            if kern=='generic': continue
            for t in ts: nk.nm_matmul(x,t,kernel=kern)
            best=1e9
            for rep in range(5):
                t0=time.perf_counter()
                for i in range(10): nk.nm_matmul(x,ts[i%2],kernel=kern)
                best=min(best,(time.perf_counter()-t0)/10)
            print(th, str(dt)[6:], kern, f"{best*1e3:.3f} ms {ts[0].nbytes/best/1e9:.1f} GB/s read {bw:.1f}", flush=True)
