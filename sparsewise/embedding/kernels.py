"""CPU kernels of the embedding engine: one call gathers and pools every feature of a batch from
every table; one call deduplicates the ids and applies the optimizer to the rows they touch.

Legend: F = features, B = batch size, T = tables, nnz = ids in the batch, D = a table's dim,
C = output columns (sum of the features' D). Tables are addressed by raw pointers so that one
kernel call serves tables of different sizes, dims and storage types without copying them into
one buffer: ``tab_addr`` (T,) int64 address of row 0, ``tab_stride`` (T,) bytes per row,
``tab_dim`` (T,), ``tab_dtype`` (T,) 0 fp32 / 1 bf16 / 2 fp16 / 3 int8 (uint8 values, then fp32
scale and bias at byte ``ceil4(D)`` of the row). Features: ``feat_table`` (F,), ``feat_col`` (F,)
first output column, ``feat_pool`` (F,) 0 sum / 1 mean / 2 max. Bag i = f*B + b holds
``values[offsets[i]:offsets[i+1]]``.

The callers (``functional.py``) check every offset, dtype and address before a kernel runs, and
every id too, except for ``pooled_forward``, which compares each block of ids with its table's rows
before it reads any of their rows (and reports a bad one: the caller raises; the forward writes
only its own output). The kernels trust the rest. Pure-torch references of both kernels are in ``reference.py``.

Why it is faster than nn.EmbeddingBag: the gather is bound by how many cache misses are in
flight, not by bandwidth. Every gather prefetches the cache lines of the row ``pf_dist`` ids ahead
(into L2) so each core keeps many misses in flight; sum and mean bags of dims that are multiples
of 16 run a loop written in LLVM IR that keeps the bag's sums in vector registers (``make_bag``;
other bags take the generic ``pool_row``, which also handles max); tables live on transparent
huge pages (``storage.py``), which removes most TLB misses of a random gather.
"""
from __future__ import annotations

import functools

import numpy as np

from .._intrinsics import bf16_dot_available, emit_prefetch_l2, lane_sums, prefetch_row as _prefetch_row

__all__ = ["pooled_forward", "pooled_forward_dedup", "check_ids", "sort_by_row", "fused_update", "all_finite", "DTYPE_CODES", "POOL_CODES"]

DTYPE_CODES = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3}
POOL_CODES = {"sum": 0, "mean": 1, "max": 2}

# unweighted bf16 bags sum with vdpbf16ps where the CPU has AVX-512 BF16 (read when the kernels
# compile): one instruction per 16 columns instead of shift/mask + add, 2-5% faster on 256 B rows
# (session 28, one process). It flushes bf16 subnormals (|x| < 1.2e-38) and subnormal sums to 0;
# bags with an inf or NaN are pooled again the exact way.
DP_POOL = True
# bag passes reading fewer bytes a row than this prefetch into L1 (prefetcht0), others into L2 (t1).
# 0: every row into L2. On Zen 5 t0 was 3-6% faster on 256 B bf16 and 136 B int8 rows (sessions
# 26 and 28, when this was 512); on Zen 4 t1 was 1.3x (bf16) and 1.7-2.1x (int8) faster (session
# 40: 8 x 1M tables, B 8192 x 32, two processes per setting, benchmarks/results/host1_2026-12-08c),
# so t1 is the default everywhere: a small loss on one CPU instead of a large one on the other
BAG_T0_BYTES = 0
# bags whose ids pooled_forward checks in one block before gathering them (256 x 32 ids: 64 KB)
CHECK_BAGS = 256


@functools.lru_cache(maxsize=None)
def _compiled():
    # Built on first use: importing sparsewise.embedding compiles nothing.
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i32 = ir.IntType(32)

    def make_ptr(nbtype):
        @intrinsic
        def ptr(typingctx, addr):
            sig = types.CPointer(nbtype)(types.int64)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        return ptr

    f32p, u16p, u8p = make_ptr(types.float32), make_ptr(types.uint16), make_ptr(types.uint8)

    prefetch_row = _prefetch_row()  # prefetcht1 (L2) of every line of a row: see sparsewise._intrinsics
    use_dp = DP_POOL and bf16_dot_available()  # read once: the bag intrinsics below are built with it
    t0_bytes = BAG_T0_BYTES
    CHECK_BAGS_ = CHECK_BAGS

    f32 = ir.FloatType()
    v16f = ir.VectorType(f32, 16)

    def make_bag(nv, kind):
        """An intrinsic pooling 16*nv columns (at byte coloff of each row) of the bags i0..i1-1
        (ids values[offsets[i]:offsets[i+1]]) into out rows ``outaddr + (i - i0) * ostride``: sum of
        w * row, times 1/len if ``mean``. Each bag's nv accumulators stay in vector registers
        (numba keeps array accumulators in memory: every row then costs a load and a store per
        vector; measured 1.4-2x slower), and a run of bags is one call: per-bag work in numba (the
        bag's table, slices, a division) between calls cost 7% at 32 ids a bag. The row pf_dist ids ahead is
        prefetched while below pf_end (the same table). kind: 0 fp32, 1 bf16, 2 fp16, 3 int8
        (row = codes, then fp32 scale and bias at byte sboff: value = code * scale + bias)."""
        esize = (4, 2, 2, 1)[kind]

        @intrinsic
        def bag(typingctx, values, offsets, i0, i1, base, stride, coloff, sboff, weights, has_w, outaddr, ostride,
                pf_dist, pf_end, mean):
            sig = types.void(values, offsets, i0, i1, base, stride, coloff, sboff, weights, has_w, outaddr, ostride,
                             pf_dist, pf_end, mean)

            def codegen(context, builder, signature, args):
                i64 = ir.IntType(64)
                vals_, offs_, w_, hasw_, mean_ = args[0], args[1], args[8], args[9], args[14]
                i0_, i1_, base_, stride_, coloff_, sboff_, out_, ostr_, pfd_, pfe_ = (
                    context.cast(builder, args[k], signature.args[k], types.int64) for k in (2, 3, 4, 5, 6, 7, 10, 11, 12, 13))
                vdata = context.make_array(signature.args[0])(context, builder, vals_).data
                odata = context.make_array(signature.args[1])(context, builder, offs_).data
                wdata = context.make_array(signature.args[8])(context, builder, w_).data
                zero16 = ir.Constant(ir.VectorType(i32, 16), [0] * 16)

                def splat(x):
                    v = builder.insert_element(ir.Constant(v16f, ir.Undefined), x, ir.Constant(i32, 0))
                    return builder.shuffle_vector(v, ir.Constant(v16f, ir.Undefined), zero16)

                # bf16: a pair of 16-column vectors is one 64 B load of 16 words, whose low halves
                # (columns 0, 2, .., 30) and high halves (1, 3, .., 31) become fp32 by a shift and
                # a mask; they are summed apart and interleaved once per bag. Half the instructions
                # per row of widening each half: the out-of-order window then holds more rows'
                # misses (measured: 80% -> 100% of the gather limit). Unweighted bags with
                # vdpbf16ps (DP_POOL) skip the shift and mask: see rows(). Other kinds: a vector per 16.
                pairs = nv // 2 if kind == 1 else 0
                singles = list(range(2 * pairs, nv))
                zeros = ir.Constant(v16f, [0.0] * 16)
                acc_lo = [cgutils.alloca_once_value(builder, zeros) for _ in range(pairs)]
                acc_hi = [cgutils.alloca_once_value(builder, zeros) for _ in range(pairs)]
                accs = {k: cgutils.alloca_once_value(builder, zeros) for k in singles}
                hasw = builder.icmp_unsigned("!=", hasw_, ir.Constant(hasw_.type, 0))
                mean = builder.icmp_unsigned("!=", mean_, ir.Constant(mean_.type, 0))
                nbytes = 16 * nv * esize
                hint = 3 if nbytes < t0_bytes else 2  # prefetcht0 / prefetcht1

                def prefetch(addr):
                    emit_prefetch_l2(builder, addr, hint)

                v16i = ir.VectorType(i32, 16)
                sixteen = ir.Constant(v16i, [16] * 16)
                himask = ir.Constant(v16i, [-65536] * 16)

                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                                     "llvm.fma.v16f32")
                # int8: sum_j w_j (code_j * scale_j + bias_j) = sum_j (w_j scale_j) code_j + sum_j w_j bias_j,
                # the second a scalar per bag: one fused multiply-add per vector and row
                bsum = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))

                def accumulate(acc, v, scale):
                    # acc += v (unweighted: no multiply by 1), or fma(v, scale, acc)
                    if scale is None:
                        builder.store(builder.fadd(builder.load(acc), v), acc)
                    else:
                        builder.store(builder.call(fma, [v, scale, builder.load(acc)]), acc)

                dp = None
                if kind == 1 and pairs and use_dp:
                    from .._intrinsics import bfloat_type

                    v32bf = ir.VectorType(bfloat_type(), 32)
                    dp = cgutils.get_or_insert_function(
                        builder.module, ir.FunctionType(v16f, [v16f, v32bf, v32bf]), "llvm.x86.avx512bf16.dpbf16ps.512")
                    # bf16 pairs (1, 0) and (0, 1): acc_lo += x.lo * 1 + x.hi * 0, acc_hi likewise
                    ones = [builder.bitcast(ir.Constant(v16i, [c] * 16), v32bf) for c in (0x3F80, 0x3F800000)]

                def rows(s_, e_, weighted, exact=True):
                    with cgutils.for_range_slice(builder, s_, e_, ir.Constant(i64, 1), inc=True) as (j, _):
                        jp = builder.add(j, pfd_)
                        with builder.if_then(builder.icmp_signed("<", jp, pfe_), likely=True):
                            rowp = builder.add(base_, builder.mul(builder.load(builder.gep(vdata, [jp])), stride_))
                            for off in range(0, nbytes, 64):
                                prefetch(builder.add(builder.add(rowp, coloff_), ir.Constant(i64, off)))
                            if kind == 3:
                                prefetch(builder.add(rowp, sboff_))
                        row = builder.add(base_, builder.mul(builder.load(builder.gep(vdata, [j])), stride_))
                        w = builder.load(builder.gep(wdata, [j])) if weighted else ir.Constant(f32, 1.0)
                        if kind == 3:
                            sbp = builder.inttoptr(builder.add(row, sboff_), f32.as_pointer())
                            scale = builder.load(sbp, align=4)
                            bias = builder.load(builder.gep(sbp, [ir.Constant(i32, 1)]), align=4)
                            sc = splat(builder.fmul(w, scale))
                            builder.store(builder.fadd(builder.load(bsum), builder.fmul(w, bias)), bsum)
                        else:
                            sc = splat(w) if weighted else None
                        col = builder.add(row, coloff_)
                        for p in range(pairs):
                            addr = builder.add(col, ir.Constant(i64, 64 * p))
                            x = builder.load(builder.inttoptr(addr, v16i.as_pointer()), align=4)
                            if not exact:
                                xb = builder.bitcast(x, ones[0].type)
                                for acc, one in ((acc_lo[p], ones[0]), (acc_hi[p], ones[1])):
                                    builder.store(builder.call(dp, [builder.load(acc), xb, one]), acc)
                                continue
                            accumulate(acc_lo[p], builder.bitcast(builder.shl(x, sixteen), v16f), sc)
                            accumulate(acc_hi[p], builder.bitcast(builder.and_(x, himask), v16f), sc)
                        for k in singles:
                            addr = builder.add(col, ir.Constant(i64, 16 * esize * k))
                            if kind == 0:
                                v = builder.load(builder.inttoptr(addr, v16f.as_pointer()), align=4)
                            elif kind == 1:
                                h = builder.load(builder.inttoptr(addr, ir.VectorType(ir.IntType(16), 16).as_pointer()), align=2)
                                v = builder.bitcast(builder.shl(builder.zext(h, v16i), sixteen), v16f)
                            elif kind == 2:
                                h = builder.load(builder.inttoptr(addr, ir.VectorType(ir.HalfType(), 16).as_pointer()), align=2)
                                v = builder.fpext(h, v16f)
                            else:
                                q = builder.load(builder.inttoptr(addr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
                                v = builder.uitofp(q, v16f)
                            accumulate(accs[k], v, sc)

                def store(acc, addr, inv):
                    # the bag's mean multiplies by float32(1 / len), as finish_bag does
                    if kind == 3:
                        acc = builder.fadd(acc, splat(builder.load(bsum)))
                    v = builder.select(mean, builder.fmul(acc, splat(inv)), acc)
                    builder.store(v, builder.inttoptr(addr, v16f.as_pointer()), align=4)

                def clear():
                    for acc in acc_lo + acc_hi + list(accs.values()):
                        builder.store(zeros, acc)
                    builder.store(ir.Constant(f32, 0.0), bsum)

                def bags(weighted):
                    with cgutils.for_range_slice(builder, i0_, i1_, ir.Constant(i64, 1), inc=True) as (i, _):
                        s_ = builder.load(builder.gep(odata, [i]))
                        e_ = builder.load(builder.gep(odata, [builder.add(i, ir.Constant(i64, 1))]))
                        clear()
                        if dp is None or weighted:
                            rows(s_, e_, weighted)
                        else:
                            # vdpbf16ps: 1 instruction per 16 columns instead of shift/mask + add; it
                            # flushes denormals and turns an inf in the other half into NaN (inf * 0),
                            # so a bag whose sums hold a NaN is pooled again the exact way
                            rows(s_, e_, weighted, exact=False)
                            nan = None
                            for acc in acc_lo + acc_hi:
                                a = builder.load(acc)
                                u = builder.fcmp_unordered("uno", a, a)
                                nan = u if nan is None else builder.or_(nan, u)
                            i16 = ir.IntType(16)
                            bad = builder.icmp_unsigned("!=", builder.bitcast(nan, i16), ir.Constant(i16, 0))
                            with builder.if_then(bad, likely=False):
                                clear()
                                rows(s_, e_, weighted)
                        n = builder.sitofp(builder.sub(e_, s_), f32)
                        inv = builder.select(builder.fcmp_ordered(">", n, ir.Constant(f32, 0.0)),
                                             builder.fdiv(ir.Constant(f32, 1.0), n), ir.Constant(f32, 1.0))
                        out = builder.add(out_, builder.mul(builder.sub(i, i0_), ostr_))
                        for p in range(pairs):
                            lo, hi = builder.load(acc_lo[p]), builder.load(acc_hi[p])
                            for h, idx in enumerate((0, 8)):
                                mask = ir.Constant(v16i, [v for c in range(idx, idx + 8) for v in (c, 16 + c)])
                                store(builder.shuffle_vector(lo, hi, mask),
                                      builder.add(out, ir.Constant(i64, 64 * (2 * p + h))), inv)
                        for k in singles:
                            store(builder.load(accs[k]), builder.add(out, ir.Constant(i64, 64 * k)), inv)

                with builder.if_else(hasw) as (weighted, plain):
                    with weighted:
                        bags(True)
                    with plain:
                        bags(False)
                return context.get_dummy_value()

            return sig, codegen

        return bag

    # (kind, nv) -> intrinsic: nv = 8 (128 columns a pass) and the remainders 1-7
    BAGS = {(kind, nv): make_bag(nv, kind) for kind in range(4) for nv in range(1, 9)}

    def make_update_row(nv, kind):
        """An intrinsic applying optimizer ``kind`` (0 SGD, 1 Adagrad, 2 row-wise Adagrad, 3 Adam)
        to one row of 16*nv fp32 columns at ``waddr`` whose occurrences are q0..q1-1 of the sorted
        ids: g = sum over them of scale * the gradient row of its bag (scale: the id's weight if
        has_w, times 1/len for mean bags). g and the optimizer arithmetic stay in vector registers
        (through a (D,) array numba loads and stores every vector twice: the update ran at 1.6x
        the read-modify-write floor of its rows). The same operations, in the same order per
        column, as the generic path of fused_update; sum and mean features only."""

        @intrinsic
        def update_row(typingctx, tag, q0, q1, B, feat_col, feat_pool, offsets, weights, has_w, gaddr, gstride,
                       waddr, s1addr, s2addr, hp):
            sig = types.void(tag, q0, q1, B, feat_col, feat_pool, offsets, weights, has_w, gaddr, gstride,
                             waddr, s1addr, s2addr, hp)

            def codegen(context, builder, signature, args):
                i64 = ir.IntType(64)

                def arr(k):
                    return context.make_array(signature.args[k])(context, builder, args[k]).data

                def c64(v):
                    return ir.Constant(i64, v)

                def as64(k):
                    return context.cast(builder, args[k], signature.args[k], types.int64)

                def load(ptr, idx):
                    return builder.load(builder.gep(ptr, [idx]))

                def splat(x):
                    v = builder.insert_element(ir.Constant(v16f, ir.Undefined), x, ir.Constant(i32, 0))
                    return builder.shuffle_vector(v, ir.Constant(v16f, ir.Undefined), ir.Constant(ir.VectorType(i32, 16), [0] * 16))

                def vptr(addr, k):
                    return builder.inttoptr(builder.add(addr, c64(64 * k)), v16f.as_pointer())

                tagp, colp, poolp, offp, wtp, hpp = arr(0), arr(4), arr(5), arr(6), arr(7), arr(14)
                q0_, q1_, B_, hasw_, gaddr_, gstr_, waddr_, s1_, s2_ = (as64(k) for k in (1, 2, 3, 8, 9, 10, 11, 12, 13))
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
                vsqrt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f]), "llvm.sqrt.v16f32")
                ssqrt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32]), "llvm.sqrt.f32")
                zeros = ir.Constant(v16f, [0.0] * 16)
                one = ir.Constant(f32, 1.0)
                accs = [cgutils.alloca_once_value(builder, zeros) for _ in range(nv)]
                for a in accs:
                    builder.store(zeros, a)
                fslot = cgutils.alloca_once_value(builder, c64(0))
                scslot = cgutils.alloca_once_value(builder, one)
                hasw = builder.icmp_unsigned("!=", hasw_, c64(0))
                with cgutils.for_range_slice(builder, q0_, q1_, c64(1), inc=True) as (q, _):
                    t = load(tagp, q)
                    i = builder.ashr(t, c64(32))
                    j = builder.and_(t, c64(0xFFFFFFFF))
                    builder.store(c64(0), fslot)
                    with builder.if_then(builder.icmp_signed(">=", i, B_), likely=False):
                        builder.store(builder.sdiv(i, B_), fslot)
                    f = builder.load(fslot)
                    b = builder.sub(i, builder.mul(f, B_))
                    col = load(colp, f)
                    builder.store(one, scslot)
                    with builder.if_then(hasw):
                        builder.store(load(wtp, j), scslot)
                    with builder.if_then(builder.icmp_signed("==", load(poolp, f), c64(1))):
                        n = builder.sitofp(builder.sub(load(offp, builder.add(i, c64(1))), load(offp, i)), f32)
                        builder.store(builder.fdiv(builder.load(scslot), n), scslot)
                    sc = builder.load(scslot)
                    row = builder.add(gaddr_, builder.mul(builder.add(builder.mul(b, gstr_), col), c64(4)))
                    s = splat(sc)
                    for k in range(nv):
                        g = builder.load(vptr(row, k), align=4)
                        builder.store(builder.call(fma, [s, g, builder.load(accs[k])]), accs[k])
                lr, eps, b1, b2, astep = (load(hpp, ir.Constant(i32, k)) for k in range(5))
                gs = [builder.load(a) for a in accs]
                ws = [builder.load(vptr(waddr_, k), align=4) for k in range(nv)]
                if kind == 0:
                    new = [builder.fsub(w, builder.fmul(splat(lr), g)) for w, g in zip(ws, gs)]
                elif kind == 1:
                    new = []
                    for k, (w, g) in enumerate(zip(ws, gs)):
                        sp = vptr(s1_, k)
                        sv = builder.fadd(builder.load(sp, align=4), builder.fmul(g, g))
                        builder.store(sv, sp, align=4)
                        den = builder.fadd(builder.call(vsqrt, [sv]), splat(eps))
                        new.append(builder.fsub(w, builder.fdiv(builder.fmul(splat(lr), g), den)))
                elif kind == 2:
                    sq = builder.fmul(gs[0], gs[0])
                    for g in gs[1:]:
                        sq = builder.call(fma, [g, g, sq])
                    tot = lane_sums(builder, [sq])[0]
                    sp = builder.inttoptr(s1_, f32.as_pointer())
                    sv = builder.fadd(builder.load(sp, align=4), builder.fdiv(tot, ir.Constant(f32, float(16 * nv))))
                    builder.store(sv, sp, align=4)
                    step = splat(builder.fdiv(lr, builder.fadd(builder.call(ssqrt, [sv]), eps)))
                    new = [builder.fsub(w, builder.fmul(step, g)) for w, g in zip(ws, gs)]
                else:
                    new = []
                    c1 = splat(builder.fsub(one, b1))
                    c2 = splat(builder.fsub(one, b2))
                    for k, (w, g) in enumerate(zip(ws, gs)):
                        mp, vp = vptr(s1_, k), vptr(s2_, k)
                        m = builder.load(mp, align=4)
                        v = builder.load(vp, align=4)
                        m = builder.fadd(m, builder.fmul(builder.fsub(g, m), c1))
                        v = builder.fadd(v, builder.fmul(builder.fsub(builder.fmul(g, g), v), c2))
                        builder.store(m, mp, align=4)
                        builder.store(v, vp, align=4)
                        den = builder.fadd(builder.call(vsqrt, [v]), splat(eps))
                        new.append(builder.fsub(w, builder.fdiv(builder.fmul(splat(astep), m), den)))
                for k, w in enumerate(new):
                    builder.store(w, vptr(waddr_, k), align=4)
                return context.get_dummy_value()

            return sig, codegen

        return update_row

    UPDATES = {(kind, nv): make_update_row(nv, kind) for kind in range(4) for nv in range(1, 9)}

    @intrinsic
    def bf16_to_f32(typingctx, bits):
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())

        return sig, codegen

    @intrinsic
    def f16_to_f32(typingctx, bits):
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return sig, codegen

    carray = numba.carray
    njit = functools.partial(numba.njit, fastmath=False, boundscheck=False, nogil=True)

    @njit(inline="always")
    def pool_row(o, am, track, j, addr, D, dt, pool, w):
        # o (D,) output slice; adds (sum, mean) or maxes (max) w * row into it
        if dt == 0:
            row = carray(f32p(addr), D)
            if pool == 2:
                for d in range(D):
                    v = w * row[d]
                    if v > o[d]:
                        o[d] = v
                        if track:
                            am[d] = j
            elif w == 1.0:  # unweighted bags skip the multiply (measured 1.1x on 512 B rows)
                for d in range(D):
                    o[d] += row[d]
            else:
                for d in range(D):
                    o[d] += w * row[d]
        elif dt == 1:
            rowh = carray(u16p(addr), D)
            if pool == 2:
                for d in range(D):
                    v = w * bf16_to_f32(rowh[d])
                    if v > o[d]:
                        o[d] = v
            else:
                for d in range(D):
                    o[d] += w * bf16_to_f32(rowh[d])
        elif dt == 2:
            rowh = carray(u16p(addr), D)
            if pool == 2:
                for d in range(D):
                    v = w * f16_to_f32(rowh[d])
                    if v > o[d]:
                        o[d] = v
            else:
                for d in range(D):
                    o[d] += w * f16_to_f32(rowh[d])
        else:
            q = carray(u8p(addr), D)
            sb = carray(f32p(addr + (D + 3) // 4 * 4), 2)
            a = w * sb[0]
            c = w * sb[1]
            if pool == 2:
                for d in range(D):
                    v = a * np.float32(q[d]) + c
                    if v > o[d]:
                        o[d] = v
            else:
                for d in range(D):
                    o[d] += a * np.float32(q[d]) + c

    def dispatcher(name, params, table):
        # name(kind, nv, *params) calling table[(kind, nv)](*params); generated: numba needs each
        # intrinsic called by name
        src = [f"def {name}(kind, nv, {params}):"]
        for n, key in enumerate(table):
            src.append(f"    {'if' if n == 0 else 'elif'} kind == {key[0]} and nv == {key[1]}:")
            src.append(f"        F_{key[0]}_{key[1]}({params})")
        scope = {f"F_{kk}_{nn}": f for (kk, nn), f in table.items()}
        exec("\n".join(src), scope)
        return njit(inline="always")(scope[name])

    # the register bag loop and the register row update for (kind, nv)
    reg_bag = dispatcher("reg_bag", "values, offsets, i0, i1, base, stride, off, sboff, weights, has_w, outaddr, "
                                    "ostride, pf_dist, pf_end, mean", BAGS)
    reg_update = dispatcher("reg_update", "tag, q0, q1, B, feat_col, feat_pool, offsets, weights, has_w, gaddr, "
                                          "gstride, waddr, s1addr, s2addr, hp", UPDATES)

    @njit(inline="always")
    def pool_bags_reg(values, offsets, i0, i1, base, stride, D, kind, weights, has_w, outaddr, ostride, pf_dist,
                      pf_end, mean):
        # sum / mean of the bags i0..i1-1 of one feature (D % 16 == 0) into out rows ostride bytes
        # apart: up to 128 columns (8 vector registers) in one call for the whole run; wider rows
        # bag by bag in column blocks, the second block re-reading the bag's rows from cache
        esize = 4 if kind == 0 else (1 if kind == 3 else 2)
        sboff = (D + 3) // 4 * 4
        if D <= 128:
            reg_bag(kind, D // 16, values, offsets, i0, i1, base, stride, 0, sboff, weights, has_w, outaddr, ostride,
                    pf_dist, pf_end, mean)
            return
        for i in range(i0, i1):
            done = 0
            while done < D:
                nv = min(8, (D - done) // 16)
                reg_bag(kind, nv, values, offsets, i, i + 1, base, stride, done * esize, sboff, weights, has_w,
                        outaddr + (i - i0) * ostride + done * 4, ostride, pf_dist, pf_end, mean)
                done += nv * 16

    @njit(inline="always")
    def bag_slot(i, B, feat_table, feat_col, tab_dim, out, argmax, track):
        # bag i = f*B + b -> (feature, table, its output slice, its argmax slice)
        f = i // B
        b = i - f * B
        t = feat_table[f]
        col = feat_col[f]
        D = tab_dim[t]
        return f, t, out[b, col:col + D], (argmax[b, col:col + D] if track else argmax[0, 0:0])

    @njit(inline="always")
    def start_bag(o, pool):
        fill = -np.inf if pool == 2 else 0.0
        for d in range(o.shape[0]):
            o[d] = fill

    @njit(inline="always")
    def finish_bag(o, am, L, pool, track):
        # an empty max bag is 0 (as nn.EmbeddingBag); mean divides by the bag's length
        if L == 0 and pool == 2:
            for d in range(o.shape[0]):
                o[d] = 0.0
                if track:
                    am[d] = -1
        elif L > 0 and pool == 1:
            inv = np.float32(1.0) / np.float32(L)
            for d in range(o.shape[0]):
                o[d] *= inv

    @njit(inline="always")
    def ids_ok(values, s, e, n):
        # every id of values[s:e] in [0, n); run on a block just before it is gathered, so the
        # gather reads the ids from cache (a separate pass over a batch's ids cost 4% of a lookup)
        for j in range(s, e):
            v = values[j]
            if v < 0 or v >= n:
                return False
        return True

    # values (nnz,) int64, offsets (F*B+1,) int64, weights (nnz,) float32 (ignored unless has_w),
    # out (B, C) float32, argmax (B, C) int32 (written for max-pooled fp32 features if track).
    # Every id is compared with its table's rows (feat_rows) before its row is read, a block of
    # CHECK_BAGS bags at a time; a chunk meeting a bad id stops there and the call returns True
    # (the output is then partly written; the caller raises). Prefetches run ahead of the check:
    # they never fault.
    def pooled_forward(values, offsets, weights, has_w, B, feat_table, feat_col, feat_pool,
                       tab_addr, tab_stride, tab_dim, tab_dtype, out, argmax, track, pf_dist, feat_rows):
        nbags = offsets.shape[0] - 1
        nchunks = min(nbags, 8 * numba.get_num_threads())
        bad = np.zeros(max(nchunks, 1), np.bool_)
        for c in numba.prange(nchunks):
            i0 = c * nbags // nchunks
            i1 = (c + 1) * nbags // nchunks
            jend = offsets[i1]
            # the prefetch cursor: position pj in bag pi, whose table's base and stride are cached
            # (a division per id to find the table would cost more than the prefetch saves)
            pi = i0
            pj = offsets[i0]
            pend = offsets[i0 + 1]
            tp = feat_table[i0 // B]
            pbase = tab_addr[tp]
            pstride = tab_stride[tp]
            out_addr = out.ctypes.data
            C = out.shape[1]
            i = i0
            while i < i1:
                # a run of bags of one feature: the common case (sum/mean, D % 16 == 0) in one call,
                # which prefetches its own rows (within its table)
                f = i // B
                t = feat_table[f]
                D = tab_dim[t]
                pool = feat_pool[f]
                fend = min(i1, (f + 1) * B)
                # checked blocks of CHECK_BAGS bags; prefetching runs on to the feature's end
                iend = min(fend, i + CHECK_BAGS_)
                if not ids_ok(values, offsets[i], offsets[iend], feat_rows[f]):
                    bad[c] = True
                    break
                if pool != 2 and D % 16 == 0:
                    pool_bags_reg(values, offsets, i, iend, tab_addr[t], tab_stride[t], D, tab_dtype[t], weights, has_w,
                                  out_addr + ((i - f * B) * C + feat_col[f]) * 4, C * 4, pf_dist, offsets[fend],
                                  pool == 1)
                    if pj < offsets[iend]:
                        pj = offsets[iend]
                    i = iend
                    continue
                for ib in range(i, iend):
                    f, t, o, am = bag_slot(ib, B, feat_table, feat_col, tab_dim, out, argmax, track)
                    dt = tab_dtype[t]
                    base = tab_addr[t]
                    stride = tab_stride[t]
                    s = offsets[ib]
                    e = offsets[ib + 1]
                    start_bag(o, pool)
                    for j in range(s, e):
                        # keep the prefetch cursor pf_dist ids ahead, across bags and features
                        want = min(j + pf_dist, jend)
                        while pj < want:
                            while pend <= pj:
                                pi += 1
                                pend = offsets[pi + 1]
                                tp = feat_table[pi // B]
                                pbase = tab_addr[tp]
                                pstride = tab_stride[tp]
                            prefetch_row(pbase + values[pj] * pstride, pstride)
                            pj += 1
                        w = weights[j] if has_w else np.float32(1.0)
                        pool_row(o, am, track and pool == 2, j, base + values[j] * stride, D, dt, pool, w)
                    finish_bag(o, am, e - s, pool, track)
                i = iend
        return bad.any()

    # Deduplicating variant of pooled_forward (same arguments plus tab_base, total_rows): each
    # chunk of bags sorts its ids by global row, then reads every distinct row once, in address
    # order, adding it into each bag that holds it. Pays when a batch repeats rows that would not
    # stay cached between their uses (skewed ids over tables much larger than the cache).
    def pooled_forward_dedup(values, offsets, weights, has_w, B, feat_table, feat_col, feat_pool,
                             tab_addr, tab_stride, tab_dim, tab_dtype, out, argmax, track, pf_dist,
                             tab_base, total_rows):
        nbags = offsets.shape[0] - 1
        nchunks = min(nbags, 4 * numba.get_num_threads())
        bits = bits_for(total_rows)
        for c in numba.prange(nchunks):
            i0 = c * nbags // nchunks
            i1 = (c + 1) * nbags // nchunks
            s0 = offsets[i0]
            n = offsets[i1] - s0
            key = np.empty(n, np.int64)
            bag = np.empty(n, np.int32)
            for i in range(i0, i1):
                f, t, o, am = bag_slot(i, B, feat_table, feat_col, tab_dim, out, argmax, track)
                start_bag(o, feat_pool[f])
                base = tab_base[t]
                for j in range(offsets[i], offsets[i + 1]):
                    key[j - s0] = base + values[j]
                    bag[j - s0] = i
            key, pos = lsd_passes(key, np.arange(s0, s0 + n).astype(np.int64), True, bits, 0, 1, False)
            for q in range(n):
                qp = q + pf_dist
                if qp < n and (qp == 0 or key[qp] != key[qp - 1]):
                    tp = feat_table[bag[pos[qp] - s0] // B]
                    prefetch_row(tab_addr[tp] + values[pos[qp]] * tab_stride[tp], tab_stride[tp])
                j = pos[q]
                f, t, o, am = bag_slot(bag[j - s0], B, feat_table, feat_col, tab_dim, out, argmax, track)
                pool = feat_pool[f]
                w = weights[j] if has_w else np.float32(1.0)
                pool_row(o, am, track and pool == 2, j, tab_addr[t] + values[j] * tab_stride[t], o.shape[0],
                         tab_dtype[t], pool, w)
            for i in range(i0, i1):
                f, t, o, am = bag_slot(i, B, feat_table, feat_col, tab_dim, out, argmax, track)
                finish_bag(o, am, offsets[i + 1] - offsets[i], feat_pool[f], track)

    # values (nnz,), offsets (F*B+1,), feat_rows (F,) rows of each feature's table.
    # Returns the first position j whose id is negative or >= its table's rows, or -1.
    def check_ids(values, offsets, B, feat_rows):
        nbags = offsets.shape[0] - 1
        nchunks = max(1, min(nbags, 4 * numba.get_num_threads()))
        bad = np.full(nchunks, -1, np.int64)
        for c in numba.prange(nchunks):
            for i in range(c * nbags // nchunks, (c + 1) * nbags // nchunks):
                n = feat_rows[i // B]
                for j in range(offsets[i], offsets[i + 1]):
                    v = values[j]
                    if v < 0 or v >= n:
                        bad[c] = j
                        break
                if bad[c] >= 0:
                    break
        for c in range(nchunks):
            if bad[c] >= 0:
                return bad[c]
        return -1

    # Stable LSD radix passes over a[:] by bits shift0 .. shift0+bits-1 (digits of up to 11 bits),
    # on nch chunks of the array in order; tag (same length) moves with a when carry. split: a holds
    # key << 32 | low (no tag carried), and the last pass writes key to a and low << 32 to tag
    # directly (a separate unpacking sweep cost about a tenth of the sort). Returns the sorted
    # (a, tag); the inputs are used as scratch.
    @njit(inline="always")
    def lsd_passes(a, tag, carry, bits, shift0, nch, split):
        n = a.shape[0]
        passes = max(1, (bits + 10) // 11)  # digits of up to 11 bits: 16 KB of counts stay in L1
        digit = (bits + passes - 1) // passes
        nd = np.int64(1) << digit
        mask = nd - 1
        a2 = np.empty(n, np.int64)
        tag2 = np.empty(n if carry or split else 0, np.int64)
        count = np.zeros((nch, nd), np.int64)
        shift = shift0
        for p in range(passes):
            last_split = split and p == passes - 1
            for c in numba.prange(nch):
                cnt = count[c]
                cnt[:] = 0
                for q in range(c * n // nch, (c + 1) * n // nch):
                    cnt[(a[q] >> shift) & mask] += 1
            run = 0  # exclusive prefix, digit-major then chunk: chunk c's digit d goes after chunk c-1's
            for d in range(nd):
                for c in range(nch):
                    m = count[c, d]
                    count[c, d] = run
                    run += m
            for c in numba.prange(nch):
                cnt = count[c]
                for q in range(c * n // nch, (c + 1) * n // nch):
                    x = a[q]
                    d = (x >> shift) & mask
                    at = cnt[d]
                    cnt[d] = at + 1
                    if last_split:
                        a2[at] = x >> 32
                        tag2[at] = (x & 0xFFFFFFFF) << 32
                    else:
                        a2[at] = x
                        if carry:
                            tag2[at] = tag[q]
            a, a2 = a2, a
            if last_split:
                tag = tag2
            elif carry:
                tag, tag2 = tag2, tag
            shift += digit
        return a, tag

    @njit(inline="always")
    def bits_for(total_rows):
        bits = 1
        while (np.int64(1) << bits) < total_rows:
            bits += 1
        return bits

    # Sort every id of the batch by its global row (table base + id): returns (key (nnz,) the
    # sorted global rows, tag (nnz,) bag << 32 | position of each); equal keys are contiguous runs,
    # one per distinct row. The sort carries the tag with each key, so the update reads each id's
    # bag, row and position in sorted order, sequentially (through a permutation it took two
    # dependent cache misses per distinct row, which it could not overlap: it ran at about half the
    # speed of a plain read-modify-write of its rows). Callers keep nnz < 2^32. O(nnz * passes).
    # need_pos False (no per-id weights, no max pooling: the update never reads positions) and
    # rows < 2^31: key << 32 | bag sorts as one array, half the bytes and scatter streams
    # (measured 0.75-0.95 ms vs 1.7-1.9 ms on 131k ids); the tags then hold position 0.
    # Every phase runs on all threads (chunks of the ids in order, so the LSD sort stays stable):
    # serial, it ran at half speed or worse right after a parallel kernel (measured 2.5-3.2 ms vs
    # 1.3 ms; probably the pool's worker still spinning, not isolated).
    def sort_by_row(values, offsets, B, feat_table, tab_base, total_rows, need_pos):
        nnz = values.shape[0]
        nbags = offsets.shape[0] - 1
        nch = max(1, min(nnz // 4096, 2 * numba.get_num_threads()))
        packed = not need_pos and total_rows < (np.int64(1) << 31)
        key = np.empty(nnz, np.int64)
        tag = np.empty(0 if packed else nnz, np.int64)  # packed: written by the last pass
        for c in numba.prange(nch):
            for i in range(c * nbags // nch, (c + 1) * nbags // nch):
                base = tab_base[feat_table[0 if i < B else i // B]]
                for j in range(offsets[i], offsets[i + 1]):
                    if packed:
                        key[j] = ((base + values[j]) << 32) | i
                    else:
                        key[j] = base + values[j]
                        tag[j] = (np.int64(i) << 32) | j
        return lsd_passes(key, tag, not packed, bits_for(total_rows), 32 if packed else 0, nch, packed)

    # One pass over the sorted ids (key, tag from sort_by_row), a run of equal keys (one distinct
    # row) at a time: sum the row's gradient over its occurrences (per-id weights, 1/L for mean,
    # argmax routing for max) and apply the optimizer in place. Each chunk of threads' work owns the
    # runs that start in its share of the ids, so no run is split and no list of run starts is built
    # (it cost two more sweeps over the keys). kind: 0 SGD, 1 Adagrad, 2 row-wise Adagrad, 3 Adam.
    # tab_s1/tab_s2: addresses of the state tensors (0 when unused). hp float32 = (lr, eps, beta1,
    # beta2, adam_step_size): Adam as torch.optim.SparseAdam, step_size = lr * sqrt(1 - beta2^t) /
    # (1 - beta1^t). pf_dist: ids ahead whose rows (each distinct one once) and gradient rows are
    # prefetched.
    def fused_update(offsets, weights, has_w, B, feat_table, feat_col, feat_pool, key, tag, tab_base,
                     grad, argmax, tab_addr, tab_dim, tab_s1, tab_s2, kind, hp, max_dim, pf_dist):
        n = key.shape[0]
        nchunks = max(1, min(n // 64, 16 * numba.get_num_threads()))
        lr, eps, b1, b2, adam_step = hp[0], hp[1], hp[2], hp[3], hp[4]
        grad_addr = grad.ctypes.data
        gstride = grad.shape[1]
        reg = True  # no max-pooled feature: the register path serves every row of dims % 16 == 0, <= 128
        for f in range(feat_pool.shape[0]):
            if feat_pool[f] == 2:
                reg = False
        for c in numba.prange(nchunks):
            g = np.empty(max_dim, np.float32)
            q0 = c * n // nchunks
            while 0 < q0 < n and key[q0] == key[q0 - 1]:
                q0 += 1
            qe = (c + 1) * n // nchunks
            while 0 < qe < n and key[qe] == key[qe - 1]:
                qe += 1
            p = q0  # prefetch cursor: the ids before p have been prefetched
            while q0 < qe:
                q1 = q0 + 1
                while q1 < qe and key[q1] == key[q0]:
                    q1 += 1
                pend = min(q0 + pf_dist, qe)
                while p < pend:
                    ip = tag[p] >> 32
                    fp = 0 if ip < B else ip // B  # one feature: no division per id
                    tp = feat_table[fp]
                    rb = tab_dim[tp] * 4
                    if p == 0 or key[p] != key[p - 1]:  # a new distinct row: it and its state
                        rp = key[p] - tab_base[tp]
                        prefetch_row(tab_addr[tp] + rp * rb, rb)
                        if kind == 1 or kind == 3:
                            prefetch_row(tab_s1[tp] + rp * rb, rb)
                        elif kind == 2:
                            prefetch_row(tab_s1[tp] + rp * 4, 4)
                        if kind == 3:
                            prefetch_row(tab_s2[tp] + rp * rb, rb)
                    # and the id's gradient row (the (B, C) gradient is L3-resident)
                    prefetch_row(grad_addr + ((ip - fp * B) * gstride + feat_col[fp]) * 4, rb)
                    p += 1
                i = tag[q0] >> 32
                t = feat_table[0 if i < B else i // B]
                D = tab_dim[t]
                r = key[q0] - tab_base[t]
                if reg and D % 16 == 0 and D <= 128:  # the common case, in vector registers
                    reg_update(kind, D // 16, tag, q0, q1, B, feat_col, feat_pool, offsets, weights, has_w, grad_addr,
                               gstride, tab_addr[t] + r * D * 4, tab_s1[t] + r * (4 if kind == 2 else D * 4),
                               tab_s2[t] + r * D * 4, hp)
                    q0 = q1
                    continue
                for d in range(D):
                    g[d] = 0.0
                for q in range(q0, q1):
                    i = tag[q] >> 32
                    f = i // B
                    b = i - f * B
                    col = feat_col[f]
                    gr = grad[b, col:col + D]
                    sc = weights[tag[q] & 0xFFFFFFFF] if has_w else np.float32(1.0)
                    if feat_pool[f] == 2:
                        j = tag[q] & 0xFFFFFFFF
                        am = argmax[b, col:col + D]
                        for d in range(D):
                            if am[d] == j:
                                g[d] += sc * gr[d]
                    else:
                        if feat_pool[f] == 1:
                            sc = sc / np.float32(offsets[i + 1] - offsets[i])
                        for d in range(D):
                            g[d] += sc * gr[d]
                w = carray(f32p(tab_addr[t] + r * D * 4), D)
                if kind == 0:
                    for d in range(D):
                        w[d] -= lr * g[d]
                elif kind == 1:
                    s = carray(f32p(tab_s1[t] + r * D * 4), D)
                    for d in range(D):
                        s[d] += g[d] * g[d]
                        w[d] -= lr * g[d] / (np.sqrt(s[d]) + eps)
                elif kind == 2:
                    s1 = carray(f32p(tab_s1[t] + r * 4), 1)
                    acc = np.float32(0.0)
                    for d in range(D):
                        acc += g[d] * g[d]
                    s1[0] += acc / np.float32(D)
                    step = lr / (np.sqrt(s1[0]) + eps)
                    for d in range(D):
                        w[d] -= step * g[d]
                else:
                    m = carray(f32p(tab_s1[t] + r * D * 4), D)
                    v = carray(f32p(tab_s2[t] + r * D * 4), D)
                    for d in range(D):
                        m[d] += (g[d] - m[d]) * (np.float32(1.0) - b1)
                        v[d] += (g[d] * g[d] - v[d]) * (np.float32(1.0) - b2)
                        w[d] -= adam_step * m[d] / (np.sqrt(v[d]) + eps)
                q0 = q1

    # True when every value of x (flat float32) is finite: v - v is 0 for finite v and NaN for
    # NaN or +-Inf, and a NaN survives any sum. 'reassoc' alone lets LLVM vectorise the sum
    # without assuming finite values (it cannot fold v - v). torch.isfinite(g).all() builds a
    # bool tensor first: 0.6 ms on a 4096 x 128 gradient, about 5% of a training step.
    def all_finite(x):
        n = x.shape[0]
        nch = max(1, min(n // 16384, 4 * numba.get_num_threads()))
        bad = np.zeros(nch, np.bool_)
        for c in numba.prange(nch):
            s = np.float32(0.0)
            for q in range(c * n // nch, (c + 1) * n // nch):
                s += x[q] - x[q]
            bad[c] = s != s
        return not bad.any()

    # Each parallel kernel also exists serial: on 2 busy cores a parallel launch can cost
    # milliseconds (torch's and numba's OpenMP pools spin against each other), more than a small
    # batch's whole lookup. The callers pick by the bytes a call moves (SERIAL_BYTES).
    par = dict(boundscheck=False, nogil=True)
    # reassoc lets LLVM vectorise the row-wise sum of squares (strict order: D dependent adds)
    upd = dict(par, fastmath={"reassoc", "contract"})
    return {
        "forward": (numba.njit(parallel=True, **par)(pooled_forward), numba.njit(**par)(pooled_forward)),
        "forward_dedup": (numba.njit(parallel=True, **par)(pooled_forward_dedup), numba.njit(**par)(pooled_forward_dedup)),
        "update": (numba.njit(parallel=True, **upd)(fused_update), numba.njit(**upd)(fused_update)),
        "check_ids": (numba.njit(parallel=True, **par)(check_ids), numba.njit(**par)(check_ids)),
        "all_finite": (numba.njit(parallel=True, fastmath={"reassoc"}, **par)(all_finite),
                       numba.njit(fastmath={"reassoc"}, **par)(all_finite)),
        "sort_by_row": (numba.njit(parallel=True, **par)(sort_by_row), numba.njit(**par)(sort_by_row)),
    }


SERIAL_BYTES = 1 << 20  # a call moving fewer row bytes than this runs on one thread


def pooled_forward(*args, moved_bytes: int) -> bool:
    """Pool every bag (see the kernel's comment for the arguments); serial below SERIAL_BYTES.
    True when it met an id out of its table's range (the output is then incomplete)."""
    return bool(_compiled()["forward"][moved_bytes < SERIAL_BYTES](*args))


def pooled_forward_dedup(*args, moved_bytes: int):
    """Deduplicating pooled lookup (sorted gather); serial below SERIAL_BYTES."""
    return _compiled()["forward_dedup"][moved_bytes < SERIAL_BYTES](*args)


def check_ids(values, offsets, B, feat_rows):
    """First position whose id is out of its table's range, or -1 (serial below SERIAL_BYTES of ids)."""
    return _compiled()["check_ids"][values.size * 8 < SERIAL_BYTES](values, offsets, B, feat_rows)


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of the float32 array ``x`` is finite (serial below SERIAL_BYTES)."""
    flat = x.reshape(-1)
    return bool(_compiled()["all_finite"][flat.size * 4 < SERIAL_BYTES](flat))


def sort_by_row(values, *args):
    """Sort the batch's ids by global row (see the kernel); serial below SERIAL_BYTES of ids and tags."""
    return _compiled()["sort_by_row"][values.size * 16 < SERIAL_BYTES](values, *args)


def fused_update(*args, moved_bytes: int):
    """Sum each distinct row's gradient and apply the optimizer; serial below SERIAL_BYTES."""
    return _compiled()["update"][moved_bytes < SERIAL_BYTES](*args)
