"""CPU kernels for grouped expert products, and the naive per-token loop that is their oracle.

Legend: E = experts, R = output rows of one expert matrix (2H for gate+up, D for down),
C = input columns (D for gate+up, H for down), N = routed rows (tokens sorted by expert,
see RoutingPlan), U = experts that received at least one row.

``grouped_matvec``: for every used expert e and its rows s..s+n (offsets[e]:offsets[e+1])
    out[s+b, r] = sum_c W[e, r, c] * x[s+b, c]
reading each used expert's weight rows exactly once per call (the rows of one expert stay in
L1 while its few tokens are multiplied), threads splitting the output rows of all used
experts. That is what decode needs: it is bound by the bytes of the experts actually used.
For many rows per expert (prefill) torch's GEMM wins and the function layer uses it instead.
bf16 weights: on CPUs with AVX-512 BF16 (and C % 32 == 0) x is rounded to bf16 and the kernel
multiplies bf16 pairs with ``vdpbf16ps`` into fp32, every token of an expert (up to 8 per pass)
in one pass over each weight row, with enough accumulator chains to hide the instruction's
latency, x cut into L1-sized input chunks of equal length (weight rows that are cut go two at a
time, sharing each x load) and the weight rows a few rows ahead asked into L2 block by block as
the compute goes; fp32 weights (C % 16 == 0) take the same kernel with 16-lane FMAs;
elsewhere the weights are widened to fp32 element by element. out is fp32.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["decode_swiglu", "decode_swiglu_nm", "grouped_matvec", "grouped_nm_matmul", "dp_available", "dp_kernel_applies", "rows_kind", "check_groups", "reference_moe", "ACTIVATIONS", "activate"]

ROWS_PER_TASK = 16  # output rows per parallel task: 16 x C weights, a 64 KB stream at C=1024 fp32

ACTIVATIONS = ("swiglu", "geglu", "gelu")

# rows per expert from which the kernel takes 2 weight rows per pass (see matvec); measured with
# interleaved pairs, Mixtral-sized experts: fp32 0.92x at 4 rows, 1.28x at 8; bf16 0.97x at 8, 1.28x at 16
WIDE_FROM = {torch.float32: 8, torch.bfloat16: 12}


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """(n, 2H) gate|up -> (n, H) for gated activations; (n, H) -> (n, H) for "gelu"."""
    if activation == "swiglu":
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    if activation == "geglu":
        g, u = h.chunk(2, dim=-1)
        return F.gelu(g) * u
    if activation == "gelu":
        return F.gelu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@functools.lru_cache(maxsize=None)
def _as_f32():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def as_f32(typingctx, raw):
        # a weight as fp32: uint16 holds bf16 bits (the high half of the fp32 bits)
        sig = types.float32(raw)

        def codegen(context, builder, signature, args):
            if signature.args[0] == types.uint16:
                wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
                return builder.bitcast(wide, ir.FloatType())
            return args[0]

        return sig, codegen

    return as_f32


@functools.lru_cache(maxsize=None)
def _compiled():
    # compiled on first use: importing sparsewise.moe compiles nothing
    import numba

    as_f32 = _as_f32()

    @numba.njit(parallel=True, fastmath=True)
    def matvec(w, x, offsets, used, out, wide_from):
        # w (E, R, C) f32|u16 ; x (N, C) f32 ; offsets (E+1,) i64 ; used (U,) i64 ; out (N, R) f32
        # from wide_from rows per expert on, 2 weight rows x 4 token rows per pass: 6 loads feed 8
        # FMAs (1.3-1.5x faster at 16-32 rows); below, 1 weight row per pass (faster at 1-4 rows)
        R = w.shape[1]
        C = w.shape[2]
        per = (R + 15) // 16
        for task in numba.prange(used.shape[0] * per):
            e = used[task // per]
            r0 = (task % per) * 16
            rend = min(R, r0 + 16)
            s = offsets[e]
            n = offsets[e + 1] - s
            r = r0
            while r < rend and n < wide_from:  # few rows: one weight row per pass (faster there)
                b = 0
                while b + 4 <= n:
                    a00 = np.float32(0.0)
                    a01 = np.float32(0.0)
                    a02 = np.float32(0.0)
                    a03 = np.float32(0.0)
                    for c in range(C):
                        w0 = as_f32(w[e, r, c])
                        a00 += w0 * x[s + b, c]
                        a01 += w0 * x[s + b + 1, c]
                        a02 += w0 * x[s + b + 2, c]
                        a03 += w0 * x[s + b + 3, c]
                    out[s + b, r] = a00
                    out[s + b + 1, r] = a01
                    out[s + b + 2, r] = a02
                    out[s + b + 3, r] = a03
                    b += 4
                while b < n:
                    a00 = np.float32(0.0)
                    for c in range(C):
                        a00 += as_f32(w[e, r, c]) * x[s + b, c]
                    out[s + b, r] = a00
                    b += 1
                r += 1
            while r < rend:
                r1 = r + 1 if r + 1 < rend else r  # an odd last row is computed twice, written once
                b = 0
                while b + 4 <= n:
                    a00 = np.float32(0.0)
                    a01 = np.float32(0.0)
                    a02 = np.float32(0.0)
                    a03 = np.float32(0.0)
                    a10 = np.float32(0.0)
                    a11 = np.float32(0.0)
                    a12 = np.float32(0.0)
                    a13 = np.float32(0.0)
                    for c in range(C):
                        w0 = as_f32(w[e, r, c])
                        w1 = as_f32(w[e, r1, c])
                        x0 = x[s + b, c]
                        x1 = x[s + b + 1, c]
                        x2 = x[s + b + 2, c]
                        x3 = x[s + b + 3, c]
                        a00 += w0 * x0
                        a01 += w0 * x1
                        a02 += w0 * x2
                        a03 += w0 * x3
                        a10 += w1 * x0
                        a11 += w1 * x1
                        a12 += w1 * x2
                        a13 += w1 * x3
                    out[s + b, r] = a00
                    out[s + b + 1, r] = a01
                    out[s + b + 2, r] = a02
                    out[s + b + 3, r] = a03
                    out[s + b, r1] = a10
                    out[s + b + 1, r1] = a11
                    out[s + b + 2, r1] = a12
                    out[s + b + 3, r1] = a13
                    b += 4
                while b < n:
                    a00 = np.float32(0.0)
                    a10 = np.float32(0.0)
                    for c in range(C):
                        x0 = x[s + b, c]
                        a00 += as_f32(w[e, r, c]) * x0
                        a10 += as_f32(w[e, r1, c]) * x0
                    out[s + b, r] = a00
                    out[s + b, r1] = a10
                    b += 1
                r += 2

    return matvec


def dp_available() -> bool:
    """True when bf16 weights can take the vdpbf16ps kernel (AVX-512 BF16)."""
    from .._intrinsics import bf16_dot_available

    return bf16_dot_available()


def dp_kernel_applies(w: torch.Tensor) -> bool:
    """True when :func:`grouped_matvec` runs stacked weights ``w`` (E, R, C) through the
    vdpbf16ps kernel: bf16 weights, C % 32 == 0, AVX-512 BF16."""
    return w.dtype == torch.bfloat16 and w.shape[-1] % 32 == 0 and dp_available()


# tokens per pass over a weight row in the vdpbf16ps kernel (one accumulator chain or more each)
DP_TOKENS = 8
# bytes of x rows per pass (cut into chunks of the inputs beyond): they stay in the 32 KB L1
# while the weight rows stream by (8 tokens of the down matrix's 2816-wide rows are 45 KB)
DP_X_BYTES = 16384
# weight rows ahead asked into L2: a 16-row task spans too few bytes for the hardware prefetcher.
# Asked block by block as the compute goes (one prefetch per 64-byte block used), not a row's
# burst before it: paired with the burst, Mixtral-shaped experts (weights from DRAM, 2-10 tokens
# an expert) fp32 1.06-1.45x, bf16 0.99-1.18x; the whole 16-token decode fp32 1.13x, bf16 1.05x
PF_ROWS = 2
# and, for rows cut into input chunks (shorter pieces), at least this many bytes ahead
PF_BYTES = 4096
# tokens per expert from which the kernel asks ahead: with one token a row streams best on the
# hardware prefetcher alone (1-token Mixtral decode with the requests, paired: fp32 0.95-0.97x;
# bf16 0.85-0.96x, the kernel alone 0.89-0.93x of a plain read of its bytes against 0.95-0.96x
# without; DeepSeek-shaped bf16 0.96-1.01x)
PF_FROM = {"dp": 2, "f32": 2}
# fp32 experts with more rows than this (one pass) take the 2-weight-rows-per-pass kernel, which
# reuses each x load for two rows: paired, Mixtral-shaped experts from DRAM, the passes kernel vs it
# at 8 / 12 / 16 / 32 rows an expert: gate_up 1.52 / 0.92 / 0.79 / 0.58x, down 1.28 / 1.40 / 1.64 / 0.73x
F32_ROWS_MAX = DP_TOKENS


def _dp_chains(m: int, nr: int = 1) -> int:
    # accumulators per (row, token) for m tokens and nr weight rows in a pass: vdpbf16ps has ~6
    # cycles of latency and issues up to 2 a cycle, so a pass needs 8-12 independent chains to run
    # at the issue rate (the kernel had one chain per token: 4 tokens were latency-bound at 6
    # cycles per 4 products)
    if nr == 1:
        return max(1, -(-8 // m)) if m < 8 else 1
    return max(1, -(-12 // (nr * m)))


@functools.lru_cache(maxsize=None)
def _compiled_rows(kind: str):
    # kind "dp": bf16 weights and bf16 x: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes
    # per instruction, with no widening (the widening kernel was compute-bound at 16 tokens).
    # kind "f32": fp32 weights and x (C % 16 == 0), 16-lane FMAs, the same passes, chains,
    # input chunks and prefetch
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .._intrinsics import bfloat_type, emit_prefetch_l2, lane_sums

    if kind not in ("dp", "f32"):
        raise ValueError(f"kind must be 'dp' or 'f32', got {kind!r}")
    f32, i64 = ir.FloatType(), ir.IntType(64)
    v16f = ir.VectorType(f32, 16)
    vin = ir.VectorType(bfloat_type(), 32) if kind == "dp" else v16f  # 64 bytes of w or x
    esz = 2 if kind == "dp" else 4
    pf_from = PF_FROM[kind]
    pf_rows, pf_bytes = PF_ROWS, PF_BYTES  # read here: numba freezes globals when it compiles

    def c64(v):
        return ir.Constant(i64, v)

    def make_dot(m):
        u1, u2 = _dp_chains(m, 1), _dp_chains(m, 2)

        @intrinsic
        def dot(typingctx, two, wrow, x0, xstride, c, o0, ostride, add, pf):
            # for nr = 2 if two else 1 weight rows w_i = wrow + i*xstride (weight and x rows have
            # the same length) and the m token rows x_j = x0 + j*xstride (addresses of c values,
            # 64 bytes a block):
            #   *(float*)(o0 + j*ostride + 4*i) (+)= sum_k w_i[k] * x_j[k]   (+= when add is true)
            # (two rows share each x load: a row's pass reloads every token's x, and at 4-8 tokens
            # those loads, not the products, bound the loop)
            # and, when pf != 0, each 64-byte block of w_i at w_i + pf asked into L2 as the block at
            # w_i is used: requests spread over the compute (a burst of a row's prefetches before
            # it stalls on the few miss buffers while nothing computes)
            # with u accumulators per (row, token) (64-byte blocks round-robin), summed at the end
            sig = types.void(types.boolean, types.int64, types.int64, types.int64, types.int64, types.int64,
                             types.int64, types.boolean, types.int64)

            def codegen(context, builder, signature, args):
                two_, wrow_, x0_, xs_, c_, o0_, os_, add_, pf_ = args
                ahead = builder.icmp_signed("!=", pf_, c64(0))
                if kind == "dp":
                    dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, vin, vin]),
                                                        "llvm.x86.avx512bf16.dpbf16ps.512")
                else:
                    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3),
                                                         "llvm.fma.v16f32")
                xrows = [builder.add(x0_, builder.mul(xs_, c64(j))) for j in range(m)]
                zero = ir.Constant(v16f, [0.0] * 16)

                def body(nr, u):
                    wrows = [builder.add(wrow_, builder.mul(xs_, c64(i))) for i in range(nr)]
                    accs = [[[cgutils.alloca_once_value(builder, zero) for _ in range(u)] for _ in range(m)]
                            for _ in range(nr)]

                    def block(o, q):  # 64 bytes at byte offset o into accumulator q of every (row, token)
                        with builder.if_then(ahead):
                            for i in range(nr):
                                emit_prefetch_l2(builder, builder.add(builder.add(wrows[i], o), pf_))
                        wvs = [builder.load(builder.inttoptr(builder.add(wrows[i], o), vin.as_pointer()), align=esz)
                               for i in range(nr)]
                        for j in range(m):
                            xv = builder.load(builder.inttoptr(builder.add(xrows[j], o), vin.as_pointer()), align=esz)
                            for i in range(nr):
                                acc = builder.load(accs[i][j][q])
                                acc = (builder.call(dp, [acc, wvs[i], xv]) if kind == "dp"
                                       else builder.call(fma, [wvs[i], xv, acc]))
                                builder.store(acc, accs[i][j][q])

                    nbytes = builder.mul(c_, c64(esz))
                    main = builder.mul(builder.udiv(nbytes, c64(64 * u)), c64(64 * u))
                    with cgutils.for_range_slice(builder, c64(0), main, c64(64 * u), inc=True) as (o, _):
                        for q in range(u):
                            block(builder.add(o, c64(64 * q)), q)
                    if u > 1:  # the last blocks when c / 32 is not a multiple of u
                        with cgutils.for_range_slice(builder, main, nbytes, c64(64), inc=True) as (o, _):
                            block(o, 0)
                    tot = []
                    for i in range(nr):
                        for j in range(m):
                            t = builder.load(accs[i][j][0])
                            for q in range(1, u):
                                t = builder.fadd(t, builder.load(accs[i][j][q]))
                            tot.append(t)
                    sums = []
                    for g in range(0, m * nr, 4):
                        sums += lane_sums(builder, tot[g:g + 4])
                    for i in range(nr):
                        for j in range(m):
                            optr = builder.inttoptr(builder.add(o0_, builder.add(builder.mul(os_, c64(j)), c64(4 * i))),
                                                    f32.as_pointer())
                            s_ = sums[i * m + j]
                            with builder.if_then(add_):
                                builder.store(builder.fadd(builder.load(optr), s_), optr)
                            with builder.if_then(builder.not_(add_)):
                                builder.store(s_, optr)

                with builder.if_else(two_) as (pair, single):
                    with pair:
                        body(2, u2)
                    with single:
                        body(1, u1)
                return context.get_dummy_value()

            return sig, codegen

        return dot

    d1, d2, d3, d4, d5, d6, d7, d8 = (make_dot(m) for m in range(1, DP_TOKENS + 1))

    @numba.njit(inline="always")
    def dot(m, two, wr, x0, rowb, c, o0, ostride, add, pf):
        if m == 8:
            d8(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 4:
            d4(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 1:
            d1(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 2:
            d2(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 3:
            d3(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 5:
            d5(two, wr, x0, rowb, c, o0, ostride, add, pf)
        elif m == 6:
            d6(two, wr, x0, rowb, c, o0, ostride, add, pf)
        else:
            d7(two, wr, x0, rowb, c, o0, ostride, add, pf)

    @numba.njit(parallel=True)
    def matvec_dp(w, xb, offsets, used, out):
        # w (E, R, C), xb (N, C): bf16 bits ("dp", C % 32 == 0) or fp32 ("f32", C % 16 == 0)
        # -> out (N, R) f32; tasks of 16 output rows of one expert; every token of the expert in
        # one pass over a weight row (passes of up to DP_TOKENS), the row read once from memory.
        # Paired with the one-chain-per-token, 4-tokens-per-pass kernel before it, Mixtral-shaped
        # 16-token bf16 decode: gate_up 4.01 -> 3.56 ms, down 2.79 -> 2.17 ms (weights from DRAM)
        R = w.shape[1]
        C = w.shape[2]
        per = (R + 15) // 16
        wa = w.ctypes.data
        xa = xb.ctypes.data
        oa = out.ctypes.data
        rowb = C * esz
        for task in numba.prange(used.shape[0] * per):
            e = used[task // per]
            r0 = (task % per) * 16
            s = offsets[e]
            n = offsets[e + 1] - s
            # chunks of the inputs such that a pass's x rows stay in L1 while weight rows stream by
            chunk = max(32, DP_X_BYTES // (esz * min(n, DP_TOKENS)) // 32 * 32)
            rows = min(R, r0 + 16) - r0
            nch = (C + chunk - 1) // chunk
            # balanced chunks (no short tail piece: 2720 + 96 values became 1408 + 1408); cut rows
            # ask at least PF_BYTES ahead, an even number of pieces (they go in pairs, see below)
            chunk = ((C + nch - 1) // nch + 31) // 32 * 32
            nch = (C + chunk - 1) // chunk
            pfp = pf_rows
            if nch > 1:
                pfp = (max(pf_rows, (pf_bytes + chunk * esz - 1) // (chunk * esz)) + 1) // 2 * 2
            for k0 in range(0, C, chunk):
                kc = min(chunk, C - k0)
                r = r0
                while r < r0 + rows:
                    # rows cut into chunks go two at a time (each x load serves both rows: at 4-8
                    # tokens the loads bound the pass); whole rows one at a time, in address order
                    # (a two-row walk of whole rows defeats the L2 stream prefetcher: 0.76x, paired)
                    two = nch > 1 and r + 1 < r0 + rows
                    wr = wa + (e * R + r) * rowb + k0 * esz
                    # the piece (row, chunk) pfp pieces on in this task's order, or the next
                    # task's first rows (the same thread's next task under static scheduling),
                    # asked into L2 by the first pass (row starts at the start of a new chunk)
                    ahead = (k0 // chunk) * rows + (r - r0) + pfp
                    if ahead < nch * rows:
                        pf = (e * R + r0 + ahead % rows) * rowb + (ahead // rows) * chunk * esz
                    elif r0 + rows + ahead - nch * rows < R:
                        pf = (e * R + r0 + rows + ahead - nch * rows) * rowb
                    else:
                        pf = -1
                    pf = 0 if pf < 0 or n < pf_from else wa + pf - wr
                    b = 0
                    while b < n:
                        m = min(DP_TOKENS, n - b)
                        dot(m, two, wr, xa + (s + b) * rowb + k0 * esz, rowb, kc, oa + ((s + b) * R + r) * 4,
                            R * 4, k0 > 0, pf)
                        pf = 0
                        b += m
                    r += 2 if two else 1

    return matvec_dp


@functools.lru_cache(maxsize=None)
def _decode_helpers():
    # the steps both fused decodes share: plan checks, row gather, weighted sum per token
    import numba

    @numba.njit
    def gather_checked(x, token_index, weights, offsets, used, num_experts):
        # validate the plan (the kernels index with it and check nothing) and gather x's rows in
        # expert order
        e_ = num_experts
        t_ = x.shape[0]
        n = token_index.shape[0]
        if offsets.shape[0] != e_ + 1:
            raise ValueError("plan offsets must have num_experts + 1 entries")
        if offsets[0] != 0 or offsets[e_] != n or weights.shape[0] != n:
            raise ValueError("plan offsets must rise from 0 to the number of routed rows")
        for e in range(e_):
            if offsets[e + 1] < offsets[e]:
                raise ValueError("plan offsets must not decrease")
        for u in used:
            if u < 0 or u >= e_:
                raise ValueError("used experts must lie in [0, num_experts)")
        xs = np.empty((n, x.shape[1]), x.dtype)
        for i in range(n):
            t = token_index[i]
            if t < 0 or t >= t_:
                raise ValueError("plan token_index out of range")
            xs[i, :] = x[t, :]
        return xs

    @numba.njit
    def combine(y, token_index, weights, num_tokens):
        # out[t] = sum over the rows i of token t of weights[i] * y[i]
        out = np.zeros((num_tokens, y.shape[1]), np.float32)
        for i in range(token_index.shape[0]):
            t = token_index[i]
            wt = weights[i]
            for d in range(y.shape[1]):
                out[t, d] += wt * y[i, d]
        return out

    return gather_checked, combine


@functools.lru_cache(maxsize=None)
def _task_bounds():
    import numba

    @numba.njit
    def task_bounds(used, offsets, per, workers, c0):
        # split the tasks (per tasks an expert, in the order of used) into `workers` runs of about
        # equal work, a task costing c0 + the expert's tokens: with a static split by task count
        # one thread could get 19 of 32 routed rows (Mixtral, 16 tokens) and finish last
        nt = used.shape[0] * per
        tot = 0.0
        for u in used:
            tot += per * (c0 + offsets[u + 1] - offsets[u])
        bounds = np.full(workers + 1, nt, np.int64)
        bounds[0] = 0
        acc = 0.0
        wk = 0
        for t in range(nt):
            e = used[t // per]
            cost = c0 + offsets[e + 1] - offsets[e]
            target = min(workers - 1, int((acc + cost / 2) * workers / tot)) if tot > 0 else 0
            while wk < target:
                wk += 1
                bounds[wk] = t
            acc += cost
        return bounds

    return task_bounds


def rows_kind(w: torch.Tensor) -> str:
    """Which kernel streams stacked weights ``w`` (E, R, C) in decode: "dp" (bf16, vdpbf16ps, see
    :func:`dp_kernel_applies`), "f32" (fp32 weights, C % 16 == 0: the same passes with 16-lane
    FMAs) or "widen" (anything else: fp32 or bf16 weights widened to fp32 element by element)."""
    if dp_kernel_applies(w):
        return "dp"
    if w.dtype == torch.float32 and w.shape[-1] % 16 == 0:
        return "f32"
    return "widen"


@functools.lru_cache(maxsize=None)
def _compiled_decode(kind: str):
    # The whole dense decode of a block's experts in one compiled call (gather the routed rows,
    # gate+up, SwiGLU, down, weighted sum per token). Right after the experts' weights stream
    # through the caches, each small torch op of the same steps costs 15-200 us (cold code and
    # data), ~1 ms per 16-token call in all; one call takes them out.
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    f32, i16, i32, i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)

    def emit_silu(builder, g, ty, ity):
        # g * sigmoid(g) on a float or <16 x float>: exp(-g) by range reduction (-g = n ln2 + r,
        # |r| <= ln2 / 2) and a degree-6 polynomial (the classic single-precision scheme, ~1 ulp),
        # 2^n built from exponent bits; branch-free. Outside [-88, 3.4e38] the result is
        # g * (g > 0), as torch gives: -0 below -88, +inf -> inf, -inf and NaN -> NaN.
        vec = isinstance(ty, ir.VectorType)

        def c(v, t=ty):
            return ir.Constant(t, [v] * t.count) if vec else ir.Constant(t, v)

        floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty]),
                                               "llvm.floor.v16f32" if vec else "llvm.floor.f32")
        t = builder.fsub(c(-0.0), g)
        t = builder.select(builder.fcmp_ordered("<", t, c(-87.0)), c(-87.0), t)
        t = builder.select(builder.fcmp_ordered(">", t, c(88.0)), c(88.0), t)
        n = builder.call(floor, [builder.fadd(builder.fmul(t, c(1.44269504)), c(0.5))])
        r = builder.fsub(builder.fsub(t, builder.fmul(n, c(0.693359375))), builder.fmul(n, c(-2.12194440e-4)))
        p = c(1.9875691500e-4)
        for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = builder.fadd(builder.fmul(p, r), c(k))
        poly = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), c(1.0))
        two_n = builder.bitcast(builder.shl(builder.fptosi(builder.fadd(n, c(127.0)), ity), c(23, ity)), ty)
        fast = builder.fdiv(g, builder.fadd(c(1.0), builder.fmul(poly, two_n)))
        ok = builder.and_(builder.fcmp_ordered(">=", g, c(-88.0)), builder.fcmp_ordered("<=", g, c(3.4e38)))
        alt = builder.fmul(g, builder.select(builder.fcmp_ordered(">", g, c(0.0)), c(1.0), c(0.0)))
        return builder.select(ok, fast, alt)

    def emit_bf16(builder, v, ity, sty):
        # float32 -> bf16 bits rounded to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN
        vec = isinstance(ity, ir.VectorType)

        def c(x):
            return ir.Constant(ity, [x] * ity.count) if vec else ir.Constant(ity, x)

        b = builder.bitcast(v, ity)
        hi = builder.lshr(b, c(16))
        rounded = builder.lshr(builder.add(builder.add(b, c(0x7FFF)), builder.and_(hi, c(1))), c(16))
        nan = builder.fcmp_unordered("uno", v, v)
        return builder.trunc(builder.select(nan, builder.or_(hi, c(0x40)), rounded), sty)

    def make_swiglu(to_bf16):
        @intrinsic
        def swiglu_row(typingctx, gate, up, out, n):
            # out[j] = silu(gate[j]) * up[j], j < n (addresses of float32 rows; out float32 or
            # bf16 bits): 16 lanes at a time, then one by one
            sig = types.void(types.int64, types.int64, types.int64, types.int64)

            def codegen(context, builder, signature, args):
                gate_, up_, out_, n_ = args
                lanes = [(ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i16, 16), 16),
                         (f32, i32, i16, 1)]
                main = builder.mul(builder.udiv(n_, ir.Constant(i64, 16)), ir.Constant(i64, 16))
                for (ty, ity, sty, width), (lo, hi) in zip(lanes, ((ir.Constant(i64, 0), main), (main, n_))):
                    with cgutils.for_range_slice(builder, lo, hi, ir.Constant(i64, width), inc=True) as (j, _):
                        off4 = builder.mul(j, ir.Constant(i64, 4))
                        g = builder.load(builder.inttoptr(builder.add(gate_, off4), ty.as_pointer()), align=4)
                        u = builder.load(builder.inttoptr(builder.add(up_, off4), ty.as_pointer()), align=4)
                        v = builder.fmul(emit_silu(builder, g, ty, ity), u)
                        if to_bf16:
                            optr = builder.add(out_, builder.mul(j, ir.Constant(i64, 2)))
                            builder.store(emit_bf16(builder, v, ity, sty), builder.inttoptr(optr, sty.as_pointer()), align=2)
                        else:
                            builder.store(v, builder.inttoptr(builder.add(out_, off4), ty.as_pointer()), align=4)
                return context.get_dummy_value()

            return sig, codegen

        return swiglu_row

    dp = kind == "dp"
    swiglu_row = make_swiglu(dp)

    @numba.njit
    def swiglu_rows(h, a):
        # a[i] = silu(h[i, :H]) * h[i, H:]; h and a are arguments, so the caller's references keep
        # them alive while their raw addresses are in use (a local array whose last use is taking
        # its address is freed by numba right after: use-after-free)
        n, hh = a.shape
        ha, aa = h.ctypes.data, a.ctypes.data
        for i in range(n):
            swiglu_row(ha + i * 2 * hh * 4, ha + (i * 2 * hh + hh) * 4, aa + i * hh * a.itemsize, hh)

    gather_checked, combine = _decode_helpers()
    if kind in ("dp", "f32"):
        matvec_rows = _compiled_rows(kind)
    if kind != "dp":
        matvec_f32 = _compiled()

    f32_rows_max = F32_ROWS_MAX

    @numba.njit
    def run(w, x, offsets, used, out, wide_from):
        if kind == "dp":
            matvec_rows(w, x, offsets, used, out)
        elif kind == "f32":  # experts with up to F32_ROWS_MAX rows here, the others 2 rows a pass
            rows = offsets[used + 1] - offsets[used]
            few, many = used[rows <= f32_rows_max], used[rows > f32_rows_max]
            if few.shape[0]:
                matvec_rows(w, x, offsets, few, out)
            if many.shape[0]:
                matvec_f32(w, x, offsets, many, out, wide_from)
        else:
            matvec_f32(w, x, offsets, used, out, wide_from)

    @numba.njit
    def decode(gate_up, down, x, token_index, weights, offsets, used, wide_from):
        # gate_up (E, 2H, D), down (E, D, H): bf16 bits (dp) or f32/bf16 bits; x (T, D) bf16 bits
        # (dp) or f32; token_index, weights (N,) the plan in expert order -> (T, D) f32 with
        # out[t] = sum over t's rows i of weights[i] * down_e @ swiglu(gate_up_e @ x[t])
        E, R, D = gate_up.shape
        H = R // 2
        xs = gather_checked(x, token_index, weights, offsets, used, E)
        h = np.empty((xs.shape[0], R), np.float32)
        run(gate_up, xs, offsets, used, h, wide_from)
        a = np.empty((xs.shape[0], H), x.dtype)
        swiglu_rows(h, a)
        y = np.empty((xs.shape[0], D), np.float32)
        run(down, a, offsets, used, y, wide_from)
        return combine(y, token_index, weights, x.shape[0])

    return {"decode": decode, "swiglu_rows": swiglu_rows, "run": run}


def decode_swiglu(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, token_index: torch.Tensor,
                  weights: torch.Tensor, offsets: torch.Tensor, used: list[int]) -> torch.Tensor:
    """Inference decode of dense SwiGLU experts in one compiled call: for each routed row i (in
    expert order, expert e), ``out[token_index[i]] += weights[i] * down[e] @ swiglu(gate_up[e] @
    x[token_index[i]])``; (T, D) float32. bf16 weights with AVX-512 BF16 (and D, H % 32 == 0)
    run the vdpbf16ps kernel on bf16 x and activations, as :func:`grouped_matvec` does, fp32
    weights with D, H % 16 == 0 its fp32 twin (:func:`rows_kind`); other
    weights the fp32 kernel. Validates the plan (ValueError) before computing."""
    e_, r, d = gate_up.shape
    if r % 2 or down.shape != (e_, d, r // 2) or x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)} and x {tuple(x.shape)} do not fit")
    kind = rows_kind(gate_up)
    if rows_kind(down) != kind:
        kind = "widen"
    out = _compiled_decode(kind)["decode"](_weight_array(gate_up.detach()), _weight_array(down.detach()),
                                           _input_array(x, kind),
                               token_index.numpy(), weights.to(torch.float32).contiguous().numpy(),
                               offsets.numpy(), np.asarray(used, dtype=np.int64), WIDE_FROM[gate_up.dtype])
    return torch.from_numpy(out)


def _input_array(x: torch.Tensor, kind: str) -> np.ndarray:
    # the kernels' x: bf16 bits for "dp" (exact for a bf16 model's activations; fp32 inputs are
    # rounded, as a bf16 model computes them), fp32 otherwise
    if kind == "dp":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float32).contiguous().numpy()


def _weight_array(w: torch.Tensor) -> np.ndarray:
    if w.dtype == torch.bfloat16:
        return w.view(torch.int16).numpy().view(np.uint16)
    if w.dtype == torch.float32:
        return w.numpy()
    raise TypeError(f"grouped_matvec takes float32 or bfloat16 weights, got {w.dtype}")


def check_groups(offsets: torch.Tensor, used: list[int], n: int, e: int) -> None:
    """Raise ValueError unless ``offsets`` (E+1,) int64 runs from 0 to ``n`` without decreasing
    and ``used`` names experts in [0, E): the kernels index with these and check nothing."""
    if offsets.dtype != torch.int64 or offsets.shape != (e + 1,):
        raise ValueError(f"offsets must be int64 of shape ({e + 1},), got {offsets.dtype} {tuple(offsets.shape)}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must rise from 0 to the {n} rows of x, got {offsets.tolist()}")
    if any((not isinstance(u, int)) or u < 0 or u >= e for u in used):
        raise ValueError(f"used experts must be integers in [0, {e}), got {used}")


# (E, R, C) f32|bf16 weight, (N, C) rows sorted by expert, offsets (E+1,), used experts -> (N, R) f32
def grouped_matvec(w: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, used: list[int], *,
                   wide_from: int | None = None) -> torch.Tensor:
    """Per used expert e: ``x[offsets[e]:offsets[e+1]] @ w[e].T`` in fp32, weights read once.
    The kernel follows :func:`rows_kind`; ``wide_from`` (rows per expert from which 2 weight rows
    go per pass) forces the element-wise widening kernel.

    >>> w = torch.randn(3, 8, 4); x = torch.randn(2, 4)
    >>> y = grouped_matvec(w, x, torch.tensor([0, 0, 2, 2]), [1])
    >>> torch.allclose(y, x @ w[1].T, atol=1e-5)
    True
    """
    n, c = x.shape
    e, r, c2 = w.shape
    if c != c2 or not w.is_contiguous():
        raise ValueError(f"x has {c} columns, the (contiguous) weights {c2}")
    check_groups(offsets, used, n, e)
    out = torch.empty(n, r, dtype=torch.float32)
    if n == 0 or not used:
        return out
    kind = rows_kind(w) if wide_from is None else "widen"
    _compiled_decode(kind)["run"](_weight_array(w.detach()), _input_array(x, kind), offsets.numpy(),
                                  np.asarray(used, dtype=np.int64), out.numpy(),
                                  WIDE_FROM[w.dtype] if wide_from is None else wide_from)
    return out


def reference_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, activation: str = "swiglu", keep: torch.Tensor | None = None) -> torch.Tensor:
    """The naive per-token loop (oracle for outputs and gradients): for each token t and choice j,
    out[t] += weights[t, j] * down[e] @ act(gate_up[e] @ x[t]), e = expert_ids[t, j]; assignments
    with keep[t, j] False (capacity drops) are skipped. Computes in fp32."""
    t_, k = expert_ids.shape
    rows = []
    for t in range(t_):
        acc = torch.zeros(x.shape[1], dtype=torch.float32)
        for j in range(k):
            if keep is not None and not bool(keep[t, j]):
                continue
            e = int(expert_ids[t, j])
            h = gate_up[e].to(torch.float32) @ x[t].to(torch.float32)
            a = activate(h.unsqueeze(0), activation).squeeze(0)
            acc = acc + weights[t, j].to(torch.float32) * (down[e].to(torch.float32) @ a)
        rows.append(acc)
    return torch.stack(rows) if rows else torch.zeros(0, x.shape[1])


# ---------------------------------------------------------------- 2:4 experts (dual-side sparsity)
# The packed 2:4 row kernels of sparsewise.nm (AVX-512 "perm" for fp32 x, "dp" for bf16 values on
# AVX512_BF16), driven per (used expert, chunk of output rows) from one parallel loop: the router
# picks the token rows, the packed format skips half the weight bytes, and a decode call costs one
# kernel launch for all experts instead of one per expert.

NM_ROWS_PER_TASK = 64
# the threads split the tasks by work, a task of an expert with n routed rows costing
# NM_TASK_C0 + n (measured per 64-input block and 4 rows, bf16, from L2: 4.1 cycles at 1 row,
# 6.3 at 4, 10.5 at 8); paired against the split by task count, Mixtral-shaped 16-token 2:4
# decode on plans whose count split was uneven (19 vs 13 rows): bf16 1.05-1.11x, fp32 1.07-1.09x;
# on an even one 1.0x (c0 of 1, 2 and 4 within noise of each other). The dense decode kernel,
# bound by bytes, measured 0.97-1.03x with the same split and keeps the split by count.
NM_TASK_C0 = 2.0


@functools.lru_cache(maxsize=None)
def _compiled_nm(kernel: str):
    import numba

    from ..nm.kernels import _compiled as nm_compiled, perm_x_groups

    _par, ser = nm_compiled()[kernel]
    blk = 64 if kernel == "dp" else 32
    # the order the kernel reads a block's inputs in (AVX2 "perm": 4-input groups reordered)
    groups = perm_x_groups() if kernel == "perm" else None
    order = tuple(range(blk)) if groups is None else tuple(4 * g + t for g in groups for t in range(4))

    @numba.njit(parallel=True)
    def relayout(x, rows_expert, offsets, kmain, out):
        # x (N, K) -> out: per expert segment s..s+n, the first kmain inputs block-major
        # out[s*kmain + (i*n + b)*blk + j] = x[s + b, i*blk + order[j]]
        for row in numba.prange(x.shape[0]):
            e = rows_expert[row]
            s = offsets[e]
            n = offsets[e + 1] - s
            b = row - s
            for i in range(kmain // blk):
                base = s * kmain + (i * n + b) * blk
                for j in range(blk):
                    out[base + j] = x[row, i * blk + order[j]]

    task_bounds = _task_bounds()
    c0 = NM_TASK_C0  # read here: numba freezes globals when it compiles

    @numba.njit(parallel=True)
    def grouped(vals, meta, xb, xt, offsets, used, out, R, K, kmain, nobias, chunk):
        # vals (E*R*K/2,) f32|i16 ; meta (E*R*ceil(K/8),) u8 ; xb block-major segments ; xt (N*kt,) f32
        # out (N, R) f32 ; every used expert's rows cut in chunks of NM_ROWS_PER_TASK
        half = K // 2
        row_bytes = (K // 2 * 2 + 7) // 8  # 2 bits per kept value, as in sparsewise.nm
        kt = K - kmain
        per = (R + chunk - 1) // chunk
        nw = numba.get_num_threads()
        bounds = task_bounds(used, offsets, per, nw, c0)
        nmax = 0
        for e in used:
            nmax = max(nmax, offsets[e + 1] - offsets[e])
        for wk in numba.prange(nw):  # one contiguous run of tasks per thread
            ybuf = np.empty(nmax * chunk, np.float32)  # a task's (tokens, rows) result, reused
            for task in range(bounds[wk], bounds[wk + 1]):
                e = used[task // per]
                r0 = (task % per) * chunk
                ch = min(chunk, R - r0)
                s = offsets[e]
                n = offsets[e + 1] - s
                y = ybuf[:n * ch]
                v0 = (e * R + r0) * half
                m0 = (e * R + r0) * row_bytes
                ser(vals[v0:v0 + ch * half], meta[m0:m0 + ch * row_bytes], xb[s * kmain:(s + n) * kmain],
                    xt[s * kt:(s + n) * kt], y, ch, K, n, nobias)
                for b in range(n):
                    for o in range(ch):
                        out[s + b, r0 + o] = y[b * ch + o]

    return relayout, grouped, blk


@functools.lru_cache(maxsize=None)
def _compiled_decode_nm(kernel: str):
    # decode_swiglu's one call for 2:4 experts: gather + block-major relayout per expert, the
    # grouped 2:4 kernel, SwiGLU (rounded to bf16 for "dp"), again for down, weighted sum per token
    import numba

    relayout, grouped, blk = _compiled_nm(kernel)
    swiglu_rows = _compiled_decode("dp" if kernel == "dp" else "f32")["swiglu_rows"]
    gather_checked, combine = _decode_helpers()
    dp = kernel == "dp"

    @numba.njit
    def prepare(xs, offsets, kmain):
        # xs (N, K) rows in expert order -> (block-major main part, fp32 tail (N * (K - kmain)))
        n, k = xs.shape
        e_ = offsets.shape[0] - 1
        rows_expert = np.empty(n, np.int64)
        for e in range(e_):
            for i in range(offsets[e], offsets[e + 1]):
                rows_expert[i] = e
        xb = np.empty(n * kmain, xs.dtype)
        relayout(xs, rows_expert, offsets, kmain, xb)
        kt = k - kmain
        bits = np.empty(n * kt, np.int32)  # bf16 bits are the high half of the fp32 bits
        xt = bits.view(np.float32)
        for i in range(n):
            for j in range(kt):
                if dp:
                    bits[i * kt + j] = (np.int32(xs[i, kmain + j]) & 0xFFFF) << 16
                else:
                    xt[i * kt + j] = xs[i, kmain + j]
        return xb, xt

    @numba.njit
    def decode(gu_vals, gu_meta, dn_vals, dn_meta, x, token_index, weights, offsets, used, E, R, D, H):
        xs = gather_checked(x, token_index, weights, offsets, used, E)
        n = xs.shape[0]
        nobias = np.zeros(0, np.float32)
        kmain = D // blk * blk
        xb, xt = prepare(xs, offsets, kmain)
        h = np.empty((n, R), np.float32)
        grouped(gu_vals, gu_meta, xb, xt, offsets, used, h, R, D, kmain, nobias, NM_ROWS_PER_TASK)
        a = np.empty((n, H), x.dtype)
        swiglu_rows(h, a)
        hmain = H // blk * blk
        ab, at = prepare(a, offsets, hmain)
        y = np.empty((n, D), np.float32)
        grouped(dn_vals, dn_meta, ab, at, offsets, used, y, D, H, hmain, nobias, NM_ROWS_PER_TASK)
        return combine(y, token_index, weights, x.shape[0])

    return decode


def decode_swiglu_nm(gate_up_values: torch.Tensor, gate_up_indices: torch.Tensor, down_values: torch.Tensor,
                     down_indices: torch.Tensor, x: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor,
                     offsets: torch.Tensor, used: list[int], kernel: str) -> torch.Tensor:
    """:func:`decode_swiglu` for experts packed 2:4 (stacked values and index bytes, format of
    ``sparsewise.nm``): one compiled call through the "dp" (bf16) or "perm" (fp32 x) kernels;
    (T, D) float32."""
    from ..nm.kernels import _as_kernel_values

    if kernel not in ("perm", "dp"):
        raise ValueError(f"kernel must be 'perm' or 'dp', got {kernel!r}")
    e_, r, dhalf = gate_up_values.shape
    d, h = dhalf * 2, r // 2
    if r % 2 or down_values.shape != (e_, d, h // 2) or x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"2:4 gate_up {(e_, r, d)}, down values {tuple(down_values.shape)} and x {tuple(x.shape)} do not fit")
    out = _compiled_decode_nm(kernel)(
        _as_kernel_values(gate_up_values.detach()), gate_up_indices.numpy().reshape(-1),
        _as_kernel_values(down_values.detach()), down_indices.numpy().reshape(-1), variant_input(x, ("nm", kernel)),
        token_index.numpy(),
        weights.to(torch.float32).contiguous().numpy(), offsets.numpy(), np.asarray(used, dtype=np.int64), e_, r, d, h)
    return torch.from_numpy(out)


# (E, R, K/2) kept values, (E, R, ceil(K/8)) uint8 codes, (N, K) rows sorted by expert -> (N, R) f32
def grouped_nm_matmul(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor,
                      used: list[int], kernel: str, *, chunk: int = NM_ROWS_PER_TASK) -> torch.Tensor:
    """Per used expert e: ``x[offsets[e]:offsets[e+1]] @ W_e.T`` with W_e packed 2:4 (the stacked
    ``values``/``indices`` of NMTensors, format of ``sparsewise.nm.tensor``), in one launch.
    ``kernel`` is "perm" (fp32 x) or "dp" (bf16 values, bf16 x)."""
    from ..nm.kernels import _as_kernel_values

    e_, r, half = values.shape
    k = half * 2
    n = x.shape[0]
    if kernel not in ("perm", "dp"):
        raise ValueError(f"kernel must be 'perm' or 'dp', got {kernel!r}")
    if x.dim() != 2 or x.shape[1] != k or indices.shape != (e_, r, (k + 7) // 8) or indices.dtype != torch.uint8:
        raise ValueError(f"2:4 experts of shape {(e_, r, k)} need x (N, {k}) and uint8 indices {(e_, r, (k + 7) // 8)}")
    check_groups(offsets, used, n, e_)
    out = torch.empty(n, r, dtype=torch.float32)
    if n == 0 or not used:
        return out
    relayout, grouped, blk = _compiled_nm(kernel)
    xdtype = torch.bfloat16 if kernel == "dp" else torch.float32
    kmain = k // blk * blk
    xc = x.to(xdtype).contiguous()
    counts = offsets[1:] - offsets[:-1]
    rows_expert = torch.repeat_interleave(torch.arange(e_), counts)
    xb = torch.empty(n * kmain, dtype=xdtype)
    xv = xc.view(torch.int16).numpy() if kernel == "dp" else xc.numpy()
    xbv = xb.view(torch.int16).numpy() if kernel == "dp" else xb.numpy()
    relayout(xv, rows_expert.numpy(), offsets.numpy(), kmain, xbv)
    xt = xc[:, kmain:].to(torch.float32).contiguous().numpy().reshape(-1) if kmain < k else np.zeros(0, np.float32)
    grouped(_as_kernel_values(values.detach()), indices.numpy().reshape(-1), xbv, xt, offsets.numpy(),
            np.asarray(used, dtype=np.int64), out.numpy(), r, k, kmain, np.zeros(0, np.float32), chunk)
    return out


# ---------------------------------------------------------------- the whole block in one call
# Decode spends tens of microseconds per small torch op and per crossing into compiled code
# (measured, Zen 5, 1 token: ~90 us of a Mixtral-shaped bf16 block's ~0.65 ms outside the expert
# kernel, ~145 us of a DeepSeek-shaped one's ~0.64 ms). ``_compiled_block`` runs router matmul,
# routing, routed experts, shared experts and the shared gate in one compiled call.

def variant_input(x: torch.Tensor, variant: tuple[str, str]) -> np.ndarray:
    """x (T, D) as the variant's kernel reads it: bf16 bits for "dp" (uint16 dense, int16 2:4),
    fp32 otherwise."""
    family, kind = variant
    if family == "dense":
        return _input_array(x, kind)
    if kind == "dp":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return x.to(torch.float32).contiguous().numpy()


@functools.lru_cache(maxsize=None)
def _expert_call(variant: tuple[str, str]):
    # one compiled signature for every variant: call(args, x, token_index, weights, offsets, used)
    # with ``args`` the variant's weight arrays and sizes (Experts.fused_args)
    import numba

    family, kind = variant
    if family == "dense":
        dec = _compiled_decode(kind)["decode"]

        @numba.njit
        def call(args, x, token_index, weights, offsets, used):
            return dec(args[0], args[1], x, token_index, weights, offsets, used, args[2])
    else:
        dec = _compiled_decode_nm(kind)

        @numba.njit
        def call(args, x, token_index, weights, offsets, used):
            return dec(args[0], args[1], args[2], args[3], x, token_index, weights, offsets, used,
                       args[4], args[5], args[6], args[7])
    return call


@functools.lru_cache(maxsize=None)
def _compiled_block(routed: tuple[str, str], shared: tuple[str, str] | None):
    import math as m

    import numba

    from .routing import _compiled_route

    route = _compiled_route()
    rcall = _expert_call(routed)
    scall = _expert_call(shared if shared is not None else routed)

    as_f32 = _as_f32()

    @numba.njit(fastmath=True)
    def matvec_t(xf, w, out):
        # out[t, e] = sum_c xf[t, c] * w[e, c] in fp32, reassociated (the router's few outputs);
        # w fp32 or bf16 bits
        for t in range(xf.shape[0]):
            for e in range(w.shape[0]):
                acc = np.float32(0.0)
                for c in range(xf.shape[1]):
                    acc += xf[t, c] * as_f32(w[e, c])
                out[t, e] = acc

    @numba.njit
    def round_bf16(a):
        # in place, fp32 -> nearest-even bf16 -> fp32 (a bf16 model's logits); NaN and Inf kept
        u = a.reshape(-1).view(np.uint32)
        for i in range(u.shape[0]):
            v = u[i]
            if (v & np.uint32(0x7F800000)) != np.uint32(0x7F800000):
                u[i] = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)

    @numba.njit
    def block(xf, router_w, bf16, bias, sigmoid, n_group, topk_group, k, norm, scale, most,
              xr, rargs, has_shared, xs, sargs, gate_w):
        # -> (status, out, ...): 1 done, 0 NaN/Inf logits, 2 an expert got more than `most` rows
        # (no expert math done: the caller takes the step path)
        t_ = xf.shape[0]
        logits = np.empty((t_, router_w.shape[0]), np.float32)
        matvec_t(xf, router_w, logits)
        if bf16:
            round_bf16(logits)
        ok, w, ids, slot, counts, offsets = route(logits, bias, sigmoid, n_group, topk_group, k, norm, scale)
        token_index = slot // k
        if not ok or counts.max() > most:
            return 0 if not ok else 2, np.empty((0, 0), np.float32), w, ids, slot, counts, offsets, token_index
        flat = w.reshape(-1)
        sorted_w = np.empty(slot.shape[0], np.float32)
        for i in range(slot.shape[0]):
            sorted_w[i] = flat[slot[i]]
        used = np.nonzero(counts)[0].astype(np.int64)
        out = rcall(rargs, xr, token_index, sorted_w, offsets, used)
        if has_shared:
            every = np.arange(t_).astype(np.int64)
            ones = np.ones(t_, np.float32)
            s = scall(sargs, xs, every, ones, np.array([0, t_], np.int64), np.zeros(1, np.int64))
            g = np.ones(t_, np.float32)
            if gate_w.shape[0]:
                gl = np.empty((t_, 1), np.float32)
                matvec_t(xf, gate_w, gl)
                if bf16:
                    round_bf16(gl)
                for t in range(t_):
                    g[t] = np.float32(1.0) / (np.float32(1.0) + np.float32(m.exp(-gl[t, 0])))
            for t in range(t_):
                for d in range(out.shape[1]):
                    out[t, d] += g[t] * s[t, d]
        return 1, out, w, ids, slot, counts, offsets, token_index

    return block
