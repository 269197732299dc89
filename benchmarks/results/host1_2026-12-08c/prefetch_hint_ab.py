# one process per hint: BAG_T0_BYTES set before the kernels compile; alternating rounds with the baseline
import itertools, sys, time, torch, torch.nn as nn
import sparsewise.embedding.kernels as ek
ek.BAG_T0_BYTES = int(sys.argv[1])
from sparsewise.embedding import EmbeddingBagCollection, TableConfig
from sparsewise.embedding.bench import _batches, DISTS
from sparsewise.bench import compare
T,N,D,B,L=8,1_000_000,128,8192,32
ebc=EmbeddingBagCollection([TableConfig(f"t{t}",N,D,(f"f{t}",),init="normal",seed=t) for t in range(T)]).eval()
bags=[]
for t in range(T):
    eb=nn.EmbeddingBag(N,D,mode="sum")
    with torch.no_grad(): eb.weight.copy_(ebc.weights()[t])
    bags.append(eb)
offsets=torch.arange(0,B*L,L)
pool=_batches(T,N,B,L,DISTS["uniform"],3,seed=1)
for dt in ("bf16","int8"):
    eng=ebc.quantize(dt); eng.backend="kernel"
    ca,cb=itertools.cycle(pool),itertools.cycle(pool)
    def ours(): return eng(next(ca)).values
    def base():
        v=next(cb).values
        return [bags[t](v[t*B*L:(t+1)*B*L],offsets) for t in range(T)]
    with torch.inference_mode():
        r=compare(ours,base,pairs=7)
    print("t0_bytes",sys.argv[1],dt,f"{r.ratio:.2f}x ours {r.candidate_s*1e3:.1f} ms base {r.baseline_s*1e3:.1f}",flush=True)
