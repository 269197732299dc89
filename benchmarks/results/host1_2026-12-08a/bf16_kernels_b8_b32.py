import time, torch, torch.nn.functional as F
from sparsewise.nm import kernels as nk
from sparsewise.nm.tensor import NMTensor
from sparsewise.bench import compare
torch.manual_seed(0); torch.set_grad_enabled(False)
for O,K in [(11008,4096),(4096,11008),(4096,4096)]:
    dt=torch.bfloat16
    ts=[NMTensor.from_dense(torch.randn(O,K).to(dt),2,4) for _ in range(2)]
    ds=[t.to_dense() for t in ts]
    for B in (8,32):
        x=torch.randn(B,K); xd=x.to(dt)
        c=[0]
        def dense():
            c[0]+=1; return F.linear(xd,ds[c[0]%2])
        res={}
        for kern in ("auto","dp","dprows","perm"):
            kk=None if kern=="auto" else kern
            def kc(kk=kk):
                c[0]+=1; return nk.nm_matmul(x,ts[c[0]%2],kernel=kk)
            r=compare(kc,dense,pairs=5)
            res[kern]=(round(r.ratio,2), round(r.candidate_s*1e3,3))
        print(O,K,B,res,flush=True)
