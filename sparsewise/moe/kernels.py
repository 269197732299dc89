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
multiplies bf16 pairs with ``vdpbf16ps`` into fp32 (measured, 16-token decode of the Mixtral
shape: 9.0-10.4 -> 8.0-9.0 ms); elsewhere the weights are widened to fp32 in registers. out is fp32.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grouped_matvec", "grouped_nm_matmul", "dp_available", "dp_kernel_applies", "check_groups", "reference_moe", "ACTIVATIONS", "activate"]

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
def _compiled():
    # compiled on first use: importing sparsewise.moe compiles nothing
    import numba
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
    from ..nm.kernels import cpu_flags

    return {"avx512bw", "avx512_bf16"} <= cpu_flags()


def dp_kernel_applies(w: torch.Tensor) -> bool:
    """True when :func:`grouped_matvec` runs stacked weights ``w`` (E, R, C) through the
    vdpbf16ps kernel: bf16 weights, C % 32 == 0, AVX-512 BF16."""
    return w.dtype == torch.bfloat16 and w.shape[-1] % 32 == 0 and dp_available()


@functools.lru_cache(maxsize=None)
def _compiled_dp():
    # bf16 weights and bf16 x: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes per
    # instruction, with no widening: 9 instructions per 32 weights and 4 tokens, where the
    # widening kernel needs 22 (it was compute-bound at 16 tokens: 43% of the read bandwidth)
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .._intrinsics import bfloat_type, lane_sums

    f32, i64 = ir.FloatType(), ir.IntType(64)
    v16f, v32bf = ir.VectorType(f32, 16), ir.VectorType(bfloat_type(), 32)

    def make_dot(m):
        @intrinsic
        def dot(typingctx, wrow, x0, x1, x2, x3, c):
            # sum_k w[k] * x_j[k] over c bf16 values (c % 32 == 0) for the m rows x_j (addresses)
            sig = types.UniTuple(types.float32, 4)(types.int64, types.int64, types.int64, types.int64, types.int64,
                                                   types.int64)

            def codegen(context, builder, signature, args):
                wrow_, c_ = args[0], args[5]
                xs = args[1:1 + m]
                dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v32bf, v32bf]),
                                                    "llvm.x86.avx512bf16.dpbf16ps.512")
                accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(m)]
                nbytes = builder.mul(c_, ir.Constant(i64, 2))
                with cgutils.for_range_slice(builder, ir.Constant(i64, 0), nbytes, ir.Constant(i64, 64), inc=True) as (o, _):
                    wv = builder.load(builder.inttoptr(builder.add(wrow_, o), v32bf.as_pointer()), align=2)
                    for k in range(m):
                        xv = builder.load(builder.inttoptr(builder.add(xs[k], o), v32bf.as_pointer()), align=2)
                        builder.store(builder.call(dp, [builder.load(accs[k]), wv, xv]), accs[k])
                outs = lane_sums(builder, [builder.load(a) for a in accs])
                outs += [ir.Constant(f32, 0.0)] * (4 - m)
                return context.make_tuple(builder, signature.return_type, outs)

            return sig, codegen

        return dot

    dot1, dot2, dot3, dot4 = make_dot(1), make_dot(2), make_dot(3), make_dot(4)

    @numba.njit(parallel=True)
    def matvec_dp(w, xb, offsets, used, out):
        # w (E, R, C) u16 bf16 bits, xb (N, C) u16 bf16 bits, C % 32 == 0 -> out (N, R) f32;
        # tasks of 16 output rows of one expert, up to 4 tokens per pass over a weight row (L1-resident)
        R = w.shape[1]
        C = w.shape[2]
        per = (R + 15) // 16
        wa = w.ctypes.data
        xa = xb.ctypes.data
        rowb = C * 2
        for task in numba.prange(used.shape[0] * per):
            e = used[task // per]
            r0 = (task % per) * 16
            s = offsets[e]
            n = offsets[e + 1] - s
            for r in range(r0, min(R, r0 + 16)):
                wr = wa + (e * R + r) * rowb
                b = 0
                while b + 4 <= n:
                    x0 = xa + (s + b) * rowb
                    a0, a1, a2, a3 = dot4(wr, x0, x0 + rowb, x0 + 2 * rowb, x0 + 3 * rowb, C)
                    out[s + b, r] = a0
                    out[s + b + 1, r] = a1
                    out[s + b + 2, r] = a2
                    out[s + b + 3, r] = a3
                    b += 4
                left = n - b
                if left > 0:  # the last 1-3 tokens in one more pass
                    x0 = xa + (s + b) * rowb
                    if left == 1:
                        a0, a1, a2, a3 = dot1(wr, x0, x0, x0, x0, C)
                    elif left == 2:
                        a0, a1, a2, a3 = dot2(wr, x0, x0 + rowb, x0, x0, C)
                    else:
                        a0, a1, a2, a3 = dot3(wr, x0, x0 + rowb, x0 + 2 * rowb, x0, C)
                    out[s + b, r] = a0
                    if left > 1:
                        out[s + b + 1, r] = a1
                    if left > 2:
                        out[s + b + 2, r] = a2

    return matvec_dp


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
    if wide_from is None and dp_kernel_applies(w):
        # bf16 x (exact for a bf16 model's activations; fp32 inputs are rounded, as a bf16
        # model computes them) against bf16 weights, fp32 accumulation
        xb = x.to(torch.bfloat16).contiguous()
        _compiled_dp()(_weight_array(w.detach()), xb.view(torch.int16).numpy().view(np.uint16), offsets.numpy(),
                       np.asarray(used, dtype=np.int64), out.numpy())
        return out
    xv = x.to(torch.float32).contiguous()
    if wide_from is None:
        wide_from = WIDE_FROM[w.dtype]
    _compiled()(_weight_array(w.detach()), xv.numpy(), offsets.numpy(),
                np.asarray(used, dtype=np.int64), out.numpy(), wide_from)
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


@functools.lru_cache(maxsize=None)
def _compiled_nm(kernel: str):
    import numba

    from ..nm.kernels import _compiled as nm_compiled

    _par, ser = nm_compiled()[kernel]
    blk = 64 if kernel == "dp" else 32

    @numba.njit(parallel=True)
    def relayout(x, rows_expert, offsets, kmain, out):
        # x (N, K) -> out: per expert segment s..s+n, the first kmain inputs block-major
        # out[s*kmain + (i*n + b)*blk + j] = x[s + b, i*blk + j]
        for row in numba.prange(x.shape[0]):
            e = rows_expert[row]
            s = offsets[e]
            n = offsets[e + 1] - s
            b = row - s
            for i in range(kmain // blk):
                base = s * kmain + (i * n + b) * blk
                for j in range(blk):
                    out[base + j] = x[row, i * blk + j]

    @numba.njit(parallel=True)
    def grouped(vals, meta, xb, xt, offsets, used, out, R, K, kmain, nobias, chunk):
        # vals (E*R*K/2,) f32|i16 ; meta (E*R*ceil(K/8),) u8 ; xb block-major segments ; xt (N*kt,) f32
        # out (N, R) f32 ; every used expert's rows cut in chunks of NM_ROWS_PER_TASK
        half = K // 2
        row_bytes = (K // 2 * 2 + 7) // 8  # 2 bits per kept value, as in sparsewise.nm
        kt = K - kmain
        per = (R + chunk - 1) // chunk
        for task in numba.prange(used.shape[0] * per):
            e = used[task // per]
            r0 = (task % per) * chunk
            ch = min(chunk, R - r0)
            s = offsets[e]
            n = offsets[e + 1] - s
            y = np.empty(n * ch, np.float32)
            v0 = (e * R + r0) * half
            m0 = (e * R + r0) * row_bytes
            ser(vals[v0:v0 + ch * half], meta[m0:m0 + ch * row_bytes], xb[s * kmain:(s + n) * kmain],
                xt[s * kt:(s + n) * kt], y, ch, K, n, nobias)
            for b in range(n):
                for o in range(ch):
                    out[s + b, r0 + o] = y[b * ch + o]

    return relayout, grouped, blk


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
