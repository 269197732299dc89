"""The batched bf16 2:4 kernel "dprows": y = x @ W.T for bf16 x and bf16 2:4 weights, batch >= 2.

Lanes are output rows. For a panel of 16 output rows and one group g of 4 inputs, the 16 rows'
kept pairs form one vector (a pair per 32-bit lane), and the 4 inputs x[b, 4g:4g+4] of batch row b
are 8 bytes: broadcast to every lane and picked per lane with one in-lane byte shuffle
(``vpshufb``, control from the row's 2-bit positions), then one ``vdpbf16ps`` adds both products
of all 16 rows. Per 2 useful multiply-adds of 16 rows: one 8-byte load, one shuffle, one dot
product, with no zero multiplied, where the "dp" kernel (lanes = groups of one row) permutes 64
inputs across the register (``vpermi2w``) for every row and batch row. The weight vector and the
shuffle control of a group are read by every batch row.

Weights stay in the packed row-major layout (tensor.py): each panel turns 16 rows x 16 groups
into group-major vectors in registers (a 16 x 16 32-bit transpose of the pairs; the controls
placed by byte shuffles of the index bytes, ``prep16``) one K chunk at a time into a small
per-thread buffer, while the next chunk's rows are asked for into L2, a slice per pass slice. The panel's batch rows are computed 8 at a time (then 4, 2, 1), each
pass over the chunk, accumulating 16 fp32 lanes per batch row in registers.

Written as LLVM IR through numba intrinsics (numba cannot express the shuffles); checked against
``reference_matmul`` in tests/test_nm_kernels.py.
"""
from __future__ import annotations

import functools

# groups of 4 inputs per K chunk: the panel's chunk of pairs and controls (2 x 8 KB) and 8 batch
# rows' inputs (8 x 1 KB) sit in L1. Measured (Zen 5, 4096x4096 / 4096x11008 bf16, batch 8 and
# 32, one process): 64 and 256 were 0.5-25% slower, asking for 2 chunks ahead 2-14% slower than 1.
CHUNK = 128
# the passes run over a chunk in slices of this many groups, each slice asking for its share of the
# next chunk (not all of it at once): measured with cold weights, batch 8 and 32, 1.00-1.12x over
# one request per chunk on the Llama-2 shapes and 2048x2048; slices of 16 and 32 were 0.78-1.12x
SUB = 64


def _lut():
    # vpshufb control (4 bytes of a 32-bit lane) for a group whose kept positions are i < j, keyed
    # by the group's 4 index bits i | j << 2: bytes 2i, 2i+1, 2j, 2j+1 of the 8 input bytes
    out = []
    for n in range(16):
        i, j = n & 3, n >> 2
        out.append((2 * i) | ((2 * i + 1) << 8) | ((2 * j) << 16) | ((2 * j + 1) << 24))
    return out


@functools.lru_cache(maxsize=None)
def compiled():
    """(parallel driver, serial driver), each ``driver(vals, meta, x, y, O, K, B, bias)``:
    vals (O*K/2,) int16 (bf16 bits), meta (O*row_bytes,) uint8 2-bit positions, x (B*K,) int16
    (bf16 bits, row-major), y (B*O,) float32 written, bias (O,) float32 or (0,)."""
    import numba
    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .._intrinsics import bfloat_type, prefetch_row as _prefetch_row

    prefetch_row = _prefetch_row()
    f32, i8, i32, i64 = ir.FloatType(), ir.IntType(8), ir.IntType(32), ir.IntType(64)
    v16f, v16i, v8q, v64b = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i64, 8), ir.VectorType(i8, 64)
    v32bf = ir.VectorType(bfloat_type(), 32)
    lut_values = _lut()
    lut_array = np.array(lut_values, np.int32)  # the same table for the scalar tail groups

    def c64(v):
        return ir.Constant(i64, v)

    def lanes(values):
        return ir.Constant(ir.VectorType(i32, len(values)), list(values))

    def transpose16(builder, rows):
        # 16 x 16 32-bit transpose in 4 butterfly stages: stage b exchanges element (l, k) with
        # (l ^ b, k ^ b) where bit b of l and k differ; after the 4 bits every (l, k) is at (k, l)
        rows = list(rows)
        for b in (1, 2, 4, 8):
            out = list(rows)
            for r in range(16):
                if r & b:
                    continue
                lo, hi = rows[r], rows[r ^ b]
                out[r] = builder.shuffle_vector(lo, hi, lanes([k if not k & b else 16 + (k ^ b) for k in range(16)]))
                out[r ^ b] = builder.shuffle_vector(lo, hi, lanes([k ^ b if not k & b else 16 + k for k in range(16)]))
            rows = out
        return rows

    @intrinsic
    def prep16(typingctx, vals, meta, voff, vrow, moff, mrow, nrows, wt, ct, toff):
        # 16 groups of the panel's 16 rows, row r at element offset voff + r*vrow of vals (its
        # first pair) and byte offset moff + r*mrow of meta; rows from nrows on repeat the last
        # one. Writes wt[toff + k*16 + r] = pair k of row r (32 bits), ct[...] its vpshufb control.
        sig = types.void(vals, meta, voff, vrow, moff, mrow, nrows, wt, ct, toff)

        def codegen(context, builder, signature, args):
            _, _, voff_, vrow_, moff_, mrow_, nrows_, _, _, toff_ = args

            def data(pos):
                return context.make_array(signature.args[pos])(context, builder, args[pos]).data

            vp, mp = builder.gep(data(0), [voff_]), builder.gep(data(1), [moff_])
            permd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i]),
                                                   "llvm.x86.avx512.permvar.si.512")
            lut = lanes(lut_values)
            last = builder.sub(nrows_, c64(1))
            rows = [builder.select(builder.icmp_signed("<", c64(r), nrows_), c64(r), last) if r else c64(0)
                    for r in range(16)]
            # the pairs: one 16 x 16 transpose
            wrows = [builder.load(builder.bitcast(builder.gep(vp, [builder.mul(rr, vrow_)]), v16i.as_pointer()), align=2)
                     for rr in rows]
            wbase, cbase = builder.gep(data(7), [toff_]), builder.gep(data(8), [toff_])
            for d, v in enumerate(transpose16(builder, wrows)):
                builder.store(v, builder.bitcast(builder.gep(wbase, [c64(16 * d)]), v16i.as_pointer()), align=4)
            # the controls: the 16 rows' 8 index bytes as two 64-byte vectors (row r at bytes
            # 8r..8r+7 of the pair), and the same shifted right by 4 (odd groups' codes in the low
            # nibble). Group k's 16 codes go to byte 0 of each 32-bit lane with one two-source byte
            # shuffle (vpermi2b), then the table lookup (vpermd reads only the low 4 bits of a lane)
            qs = [builder.load(builder.bitcast(builder.gep(mp, [builder.mul(rr, mrow_)]), i64.as_pointer()), align=1)
                  for rr in rows]
            halves = []
            for h in range(2):
                v = ir.Constant(v8q, ir.Undefined)
                for i in range(8):
                    v = builder.insert_element(v, qs[8 * h + i], ir.Constant(i32, i))
                halves.append(v)
            four = ir.Constant(v8q, [4] * 8)
            srcs = [[builder.bitcast(v, v64b) for v in halves],
                    [builder.bitcast(builder.lshr(v, four), v64b) for v in halves]]
            for k in range(16):
                lo, hi = srcs[k & 1]
                picked = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 64), [8 * (n // 4) + k // 2 for n in range(64)]))
                v = builder.call(permd, [lut, builder.bitcast(picked, v16i)])
                builder.store(v, builder.bitcast(builder.gep(cbase, [c64(16 * k)]), v16i.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    def make_pass(nb):
        @intrinsic
        def rows_pass(typingctx, wt, ct, x, xoff, xrow, ng, yp, yoff):
            # yp[yoff + b*16 + l] += sum_{g < ng} dp(wt[g*16 + l], pshufb(bcast(x[xoff + b*xrow + 4g : +4]), ct[g*16 + l]))
            sig = types.void(wt, ct, x, xoff, xrow, ng, yp, yoff)

            def codegen(context, builder, signature, args):
                wt_, ct_, x_, xoff_, xrow_, ng_, yp_, yoff_ = args

                def data(pos):
                    return context.make_array(signature.args[pos])(context, builder, args[pos]).data

                dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v32bf, v32bf]),
                                                    "llvm.x86.avx512bf16.dpbf16ps.512")
                pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64b, [v64b, v64b]),
                                                        "llvm.x86.avx512.pshuf.b.512")
                wp, cp = data(0), data(1)
                xp, yb = builder.gep(data(2), [xoff_]), builder.gep(data(6), [yoff_])
                accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(nb)]
                with cgutils.for_range(builder, ng_) as loop:
                    g = loop.index
                    at = builder.mul(g, c64(16))
                    w = builder.load(builder.bitcast(builder.gep(wp, [at]), v16i.as_pointer()), align=4)
                    c = builder.load(builder.bitcast(builder.gep(cp, [at]), v16i.as_pointer()), align=4)
                    w, c = builder.bitcast(w, v32bf), builder.bitcast(c, v64b)
                    xg = builder.gep(xp, [builder.mul(g, c64(4))])
                    for b in range(nb):
                        q = builder.load(builder.bitcast(builder.gep(xg, [builder.mul(xrow_, c64(b))]), i64.as_pointer()), align=2)
                        q = builder.insert_element(ir.Constant(v8q, ir.Undefined), q, ir.Constant(i32, 0))
                        q = builder.shuffle_vector(q, ir.Constant(v8q, ir.Undefined), lanes([0] * 8))
                        picked = builder.bitcast(builder.call(pshufb, [builder.bitcast(q, v64b), c]), v32bf)
                        builder.store(builder.call(dp, [builder.load(accs[b]), w, picked]), accs[b])
                for b in range(nb):
                    p = builder.bitcast(builder.gep(yb, [c64(16 * b)]), v16f.as_pointer())
                    builder.store(builder.fadd(builder.load(p, align=4), builder.load(accs[b])), p, align=4)
                return context.get_dummy_value()

            return sig, codegen

        return rows_pass

    pass8, pass4, pass2, pass1 = make_pass(8), make_pass(4), make_pass(2), make_pass(1)
    chunk, sub = CHUNK, SUB

    def driver(vals, meta, x, y, O, K, B, bias):
        half, G = K // 2, K // 4
        rb = (half * 2 + 7) // 8
        npan = (O + 15) // 16
        nch = (G + chunk - 1) // chunk
        vaddr, maddr = vals.ctypes.data, meta.ctypes.data
        nw = min(numba.get_num_threads(), npan)
        for w in numba.prange(nw):
            # each thread: a contiguous run of panels, its own buffers
            p_lo, p_hi = w * npan // nw, (w + 1) * npan // nw
            wt = np.empty(chunk * 16, np.int32)
            ct = np.empty(chunk * 16, np.int32)
            yp = np.empty(B * 16, np.float32)
            for p in range(p_lo, p_hi):
                o0 = p * 16
                nrows = min(16, O - o0)
                yp[:] = 0.0
                for c in range(nch):
                    g0 = c * chunk
                    nc = min(chunk, G - g0)
                    nfull = nc // 16 * 16
                    for k in range(0, nfull, 16):  # rows past O (the last panel) repeat row O-1, not stored
                        prep16(vals, meta, o0 * half + 2 * (g0 + k), half, o0 * rb + (g0 + k) // 2, rb, nrows,
                               wt, ct, k * 16)
                    for k in range(nfull, nc):  # groups after the last 16: scalar
                        g = g0 + k
                        for r in range(16):
                            o = min(o0 + r, O - 1)
                            lo = np.int32(vals[o * half + 2 * g]) & 0xFFFF
                            wt[k * 16 + r] = lo | (np.int32(vals[o * half + 2 * g + 1]) << 16)
                            ct[k * 16 + r] = lut_array[(meta[o * rb + (g >> 1)] >> (4 * (g & 1))) & 15]
                    # the passes over the chunk in slices of SUB groups, each slice first asking for
                    # the matching slice of this thread's next chunk (this panel's or the next one's)
                    pn, cn = (p, c + 1) if c + 1 < nch else (p + 1, 0)
                    gn = cn * chunk
                    ncn = min(chunk, G - gn) if pn < p_hi else 0
                    for s0 in range(0, nc, sub):
                        ns = min(sub, nc - s0)
                        if s0 < ncn:  # the last slice asks for all the rest (the next chunk may be longer)
                            nl = ncn - s0 if s0 + ns >= nc else min(sub, ncn - s0)
                            for r in range(16):
                                o = min(pn * 16 + r, O - 1)
                                prefetch_row(vaddr + (o * half + 2 * (gn + s0)) * 2, nl * 4)
                                if s0 == 0:
                                    prefetch_row(maddr + o * rb + gn // 2, (ncn + 1) // 2)
                        xo, so = 4 * (g0 + s0), 16 * s0
                        b0 = 0
                        while b0 + 8 <= B:
                            pass8(wt[so:], ct[so:], x, b0 * K + xo, K, ns, yp, b0 * 16)
                            b0 += 8
                        if b0 + 4 <= B:
                            pass4(wt[so:], ct[so:], x, b0 * K + xo, K, ns, yp, b0 * 16)
                            b0 += 4
                        if b0 + 2 <= B:
                            pass2(wt[so:], ct[so:], x, b0 * K + xo, K, ns, yp, b0 * 16)
                            b0 += 2
                        if b0 < B:
                            pass1(wt[so:], ct[so:], x, b0 * K + xo, K, ns, yp, b0 * 16)
                for b in range(B):  # y row by row: 0.7x when written column by column
                    for r in range(nrows):
                        y[b * O + o0 + r] = yp[b * 16 + r]
                    if bias.shape[0] > 0:
                        for r in range(nrows):
                            y[b * O + o0 + r] += bias[o0 + r]

    return numba.njit(parallel=True)(driver), numba.njit(parallel=False)(driver)
