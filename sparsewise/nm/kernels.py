"""CPU kernels for y = x @ W.T with W in packed N:M form (see tensor.py for the layout).

Legend: B = batch rows of x, K = in_features, O = out_features, NK = kept values per row,
b = index bits. All arrays are flat, C-contiguous: y (B*O,) float32, vals (O*NK,) float32 or
int16 (bf16 bit patterns), meta/indices the packed index bytes, x float32 (or bf16 bits).

Kernels (each checked against the pure-torch ``reference_matmul`` in the tests):
- 2:4, "perm" (AVX-512F, K % 32 == 0): per row and 32 inputs, load 16 kept values and one uint32
  of 2-bit positions, turn the positions into a permutation (broadcast, shift, mask, add group
  base), pick the matching x values from two registers with one ``vpermi2ps``, one FMA. bf16
  values are widened in registers. x in fp32. Its AVX2 + FMA form: x comes with each block's
  4-input groups reordered (``perm_x_groups``) so that two in-lane ``vpermilps`` on the raw
  2-bit codes and a blend pick 8 inputs; 4 output rows per pass from batch 1.
- 2:4, "dp" (AVX512_BF16, bf16 values, K % 64 == 0): per row and 64 inputs, 32 kept bf16 values
  (one pair per group) against x pairs picked with one ``vpermi2w`` from 64 bf16 inputs, one
  ``vdpbf16ps`` (two products per fp32 lane, fp32 accumulation): half the instructions of "perm".
  x in bf16, as the dense bf16 path uses it.
  Both compute 4 output rows per pass so the rows share every x load, with x stored block-major
  (the batch rows of one block side by side) so those loads come from a few cache lines. Large
  layers (>= 2 MB of kept values) at batch >= 8 run in tiles of 64 rows with K cut into chunks,
  each chunk over all the tile's rows before the next (its x stays in L1, the tile's weights stay
  in L2 across batch passes), 2 rows x 8 batch rows per call below batch 12, 4 x 4 above.
  Written as LLVM IR through numba intrinsics: numba cannot express the permutes.
- 2:4, "dprows" (AVX512_BF16, bf16 values, any K % 4 == 0; dprows.py): lanes are 16 output rows,
  one in-lane byte shuffle of 4 broadcast inputs and one ``vdpbf16ps`` per group and batch row;
  the default for bf16 2:4 weights from batch ``rows_min_batch(weight)``: 4 for large weights
  with in >= out, 16 otherwise (measured on Zen 5 with cold weights, one process: at batch 4-12
  0.97-1.29x "dp" on wide/square layers >= 2 MB, 0.79-1.08x on tall or small ones; warm, at batch
  32 1.17-1.40x, at 256 1.13-1.33x on the Llama-2 shapes).
- generic: any N:M, any K, scalar numba; the fallback and the non-2:4 path.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .._intrinsics import bf16_dot_available, cpu_flags

# Bump on any change to the kernels' speed: SparseLinear's dispatch crossovers cached on disk are
# keyed by it (sparsewise.nm.linear), so they are measured again. 2: lane sums in vector ops and
# the vpmultishiftqb decode (this was 1 implicitly); 3: L2 prefetch of the next rows when short;
# 4: row tiles with K chunks at batch >= 8, padded block-major x; 5: 4x4 tiles from batch 12;
# 6: 2x8 tiles ask for the next tile in address order; 7: "dprows" (dprows.py) for bf16 2:4 from
# batch ROWS_MIN_BATCH; 8: dprows' controls by byte shuffles, its next-chunk requests spread over
# slices, its default batch by shape; 9: "perm" on AVX2 + FMA CPUs (there the crossover was the
# scalar generic kernel's); 10: AVX2 "perm" picks with in-lane vpermilps from x with reordered
# groups, 4 rows per pass at batch 1.
KERNELS_VERSION = 10
# row tiles for large layers at batch >= 8 (make_driver): output rows per tile, 64-input blocks
# per K chunk (bf16: 8 batch rows x 32 blocks of x = 32 KB, inside L1), row-steps of prefetch
# distance, and the weight bytes above which tiles are used (under it the rows sit in cache)
_TILE_ROWS, _TILE_BLOCKS, _TILE_AHEAD, _TILE_MIN_BYTES = 64, 32, 2, 2 << 20
# 2x8 tiles (batch 8-11): weights per tile, KB (this tile computes from L2 while the next streams in)
_TILE_KB = 256

__all__ = ["KERNELS_VERSION", "cpu_flags", "avx512_available", "avx2_available", "perm_available", "nm24_supported", "available_kernels", "nm_matmul",
           "reference_matmul", "decompress_24"]


def avx512_available() -> bool:
    """True when the CPU has AVX-512F (the 2:4 permute kernel needs it)."""
    return "avx512f" in cpu_flags()


def avx2_available() -> bool:
    """True when the CPU has AVX2 and FMA (the 2:4 permute kernel's 256-bit form)."""
    flags = cpu_flags()
    return "avx2" in flags and "fma" in flags


def perm_available() -> bool:
    """True when the 2:4 permute kernel ("perm") runs here: AVX-512F, or AVX2 + FMA."""
    return avx512_available() or avx2_available()


# The AVX2 "perm" kernel's lane order: lane d of a block's 16 products is kept value
# PERM_LANES[d]. bf16 values widen by interleaving with zeros inside each 128-bit half
# (vpunpcklwd/hwd), which gives this order; fp32 values are loaded in it (the 128-bit halves
# swapped in by vinsertf128), so x has one order for both
PERM_LANES = (0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15)


def perm_x_groups() -> tuple[int, ...] | None:
    """The order the AVX2 "perm" kernel wants the 8 groups (4 inputs each) of every 32-input
    block of x in, or None (AVX-512: natural order). 128-bit lane L of 8-input half h must hold
    the group of the kept values in lanes 4L..4L+3 of that half (even pairs for h = 0, 2, odd
    for h = 1, 3), so one in-lane vpermilps picks them."""
    if avx512_available() or not avx2_available():
        return None
    return _avx2_groups()


@functools.lru_cache(maxsize=None)
def _avx2_groups() -> tuple[int, ...]:
    lanes = PERM_LANES
    out = []
    for half in range(4):  # halves 0, 1 serve product lanes 0-7, halves 2, 3 lanes 8-15
        base = 8 * (half // 2)
        for lane in range(2):
            out.append(lanes[base + 4 * lane + 2 * (half % 2)] // 2)
    return tuple(out)


def nm24_supported(n: int, m: int, k: int) -> bool:
    """The 2:4 permute kernels (AVX-512, or AVX2 + FMA) run any in_features (whole 32/64-input
    blocks vectorised, the few groups after the last block scalar)."""
    return n == 2 and m == 4 and k % 4 == 0 and perm_available()


def _dp_supported(values: torch.Tensor, k: int) -> bool:
    return values.dtype == torch.bfloat16 and bf16_dot_available()


@functools.lru_cache(maxsize=None)
def _compiled():
    # Built on first use: importing sparsewise.nm compiles nothing.
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from .._intrinsics import bfloat_type, lane_sums, prefetch_row as _prefetch_row

    prefetch_row = _prefetch_row()

    f32, i16, i32, i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    v16f, v16i, v16s = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i16, 16)
    v32s, v8q, v32bf = ir.VectorType(i16, 32), ir.VectorType(i64, 8), ir.VectorType(bfloat_type(), 32)
    v64b = ir.VectorType(ir.IntType(8), 64)
    v8f, v8i = ir.VectorType(f32, 8), ir.VectorType(i32, 8)

    def c64(v):
        return ir.Constant(i64, v)

    def splat(builder, scalar, vty, n):
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, n), [0] * n))

    def vload(builder, ptr, vty, align):
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=align)

    class Perm:
        """fp32 FMA on x values picked by vpermi2ps; 32 inputs (16 kept values) per block. On
        CPUs without AVX-512 (AVX2 + FMA) each 8-lane half of the picks is two in-lane vpermilps
        and a blend (see step); LLVM splits the 16-lane FMA in two. Measured there (Zen 3, one
        thread, weights in cache, cycles per 32-input block at batch 1): 7.3-8.5 with two
        cross-lane vpermps per 8 picks and the code + group base decode, one row per pass;
        4.4-6.6 with this form and 4 rows per pass."""
        blk = 32

        def __init__(self, mod, bf16_values):
            self.bf16 = bf16_values
            self.wide = avx512_available()
            if self.wide:
                self.perm = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(v16f, [v16f, v16i, v16f]), "llvm.x86.avx512.vpermi2var.ps.512")
            else:
                self.permil = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(v8f, [v8f, v8i]), "llvm.x86.avx.vpermilvar.ps.256")
                self.lanes = PERM_LANES  # lane d holds kept value PERM_LANES[d]
                self.zero16 = ir.Constant(v16s, [0] * 16)
            self.fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
            self.shifts = ir.Constant(v16i, [2 * k for k in (range(16) if self.wide else self.lanes)])
            if self.wide:  # vpermi2ps indexes 32 inputs: the code plus its group's base
                self.base = ir.Constant(v16i, [(k // 2) * 4 for k in range(16)])
                self.three = ir.Constant(v16i, [3] * 16)

        def decode(self, builder, mptr, i):
            # mptr: the row's index bytes; block i's 16 codes are bytes 4i..4i+3 (rows are not
            # word-aligned when K % 32 != 0, hence align=1)
            word = builder.load(builder.bitcast(builder.gep(mptr, [builder.mul(i, c64(4))]), i32.as_pointer()), align=1)
            if not self.wide:  # vpermilps reads the low 2 bits of each lane: the code itself
                return builder.lshr(splat(builder, word, v16i, 16), self.shifts)
            return builder.add(builder.and_(builder.lshr(splat(builder, word, v16i, 16), self.shifts), self.three),
                               self.base)

        def weights(self, builder, vptr, i):
            wp = builder.gep(vptr, [builder.mul(i, c64(16))])
            if self.bf16 and not self.wide:  # (0, w) pairs: fp32 lanes in self.lanes order
                raw = vload(builder, wp, v16s, 2)
                mask = [t for k in self.lanes for t in (0, 16 + k)]
                return builder.bitcast(builder.shuffle_vector(self.zero16, raw, ir.Constant(ir.VectorType(i32, 32), mask)), v16f)
            if self.bf16:  # bf16 bits are the high half of the fp32 bits
                raw = builder.zext(vload(builder, wp, v16s, 2), v16i)
                return builder.bitcast(builder.shl(raw, ir.Constant(v16i, [16] * 16)), v16f)
            if not self.wide:
                return builder.shuffle_vector(vload(builder, wp, v16f, 4), ir.Constant(v16f, ir.Undefined),
                                              ir.Constant(v16i, list(self.lanes)))
            return vload(builder, wp, v16f, 4)

        def x_pair(self, builder, xp):
            return vload(builder, xp, v16f, 4), vload(builder, builder.gep(xp, [c64(16)]), v16f, 4)

        def step(self, builder, acc, w, idx, lo, hi):
            if self.wide:
                return builder.call(self.fma, [w, builder.call(self.perm, [lo, idx, hi]), acc])
            # AVX2: x comes with the groups of each block in perm_x_groups order, so each 8-input
            # half of lo/hi holds, per 128-bit lane, the group of the kept values in that lane's
            # even (first 8-lane half: 0-1, 4-5) or odd (2-3, 6-7) pairs: two in-lane vpermilps
            # (the code picks inside the group) and a blend give 8 picks
            def part(v, q):
                return builder.shuffle_vector(v, v, ir.Constant(v8i, [8 * q + t for t in range(8)]))

            halves = []
            for src, q in ((lo, 0), (hi, 1)):
                ix = part(idx, q)
                a, b = builder.call(self.permil, [part(src, 0), ix]), builder.call(self.permil, [part(src, 1), ix])
                halves.append(builder.shuffle_vector(a, b, ir.Constant(v8i, [0, 1, 10, 11, 4, 5, 14, 15])))
            picked = builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16i, list(range(16))))
            return builder.call(self.fma, [w, picked, acc])

    class Dp:
        """bf16 pair dot products (vdpbf16ps) on x pairs picked by vpermi2w; 64 inputs per block."""
        blk = 64

        def __init__(self, mod, bf16_values):
            assert bf16_values
            self.perm = cgutils.get_or_insert_function(
                mod, ir.FunctionType(v32s, [v32s, v32s, v32s]), "llvm.x86.avx512.vpermi2var.hi.512")
            self.dp = cgutils.get_or_insert_function(
                mod, ir.FunctionType(v16f, [v16f, v32bf, v32bf]), "llvm.x86.avx512bf16.dpbf16ps.512")
            # kept value j of a block: its 2-bit code sits in 16-bit chunk j // 8 of the uint64
            self.chunk = ir.Constant(ir.VectorType(i32, 32), [j // 8 for j in range(32)])
            self.shifts = ir.Constant(v32s, [2 * (j % 8) for j in range(32)])
            self.base = ir.Constant(v32s, [4 * (j // 2) for j in range(32)])
            self.three = ir.Constant(v32s, [3] * 32)
            self.multishift = None
            if "avx512vbmi" in cpu_flags():
                self.multishift = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(v64b, [v64b, v64b]), "llvm.x86.avx512.pmultishift.qb.512")
                self.ctrl = ir.Constant(v64b, [j if j % 2 == 0 else 0 for j in range(64)])  # byte 2j: bit 2j

        def decode(self, builder, mptr, i):
            q = builder.load(builder.bitcast(builder.gep(mptr, [builder.mul(i, c64(8))]), i64.as_pointer()), align=1)
            if self.multishift is not None:
                # vpmultishiftqb: word j's low byte <- the 8 bits of q from bit 2j (code j in bits
                # 0-1); the mask clears the rest of the word and the group base goes in bits 2-5:
                # 2 vector ops where the word shuffle + variable shift below take 3
                picked = builder.call(self.multishift, [self.ctrl, builder.bitcast(splat(builder, q, v8q, 8), v64b)])
                return builder.or_(builder.and_(builder.bitcast(picked, v32s), self.three), self.base)
            halves = builder.bitcast(splat(builder, q, v8q, 8), v32s)
            halves = builder.shuffle_vector(halves, ir.Constant(v32s, ir.Undefined), self.chunk)
            return builder.add(builder.and_(builder.lshr(halves, self.shifts), self.three), self.base)

        def weights(self, builder, vptr, i):
            return builder.bitcast(vload(builder, builder.gep(vptr, [builder.mul(i, c64(32))]), v32s, 2), v32bf)

        def x_pair(self, builder, xp):
            return vload(builder, xp, v32s, 2), vload(builder, builder.gep(xp, [c64(32)]), v32s, 2)

        def step(self, builder, acc, w, idx, lo, hi):
            return builder.call(self.dp, [acc, w, builder.bitcast(builder.call(self.perm, [lo, idx, hi]), v32bf)])

    def make_dot(scheme, nb: int, nr: int, accumulate: bool = False):
        @intrinsic
        def dot(typingctx, vals, voff, vrow, meta, moff, mrow, x, xoff, xblk, nblk, y, yoff, ystride):
            # For output rows r < nr and batch rows b < nb (blk = scheme.blk inputs per block):
            #   y[yoff + r + b*ystride] = sum_i vals[voff + r*vrow + i*blk/2 ...] . x[xoff + i*xblk + b*blk + perm(r, i)]
            # x is block-major: the batch rows of one block are blk elements apart, so the nr rows
            # share every x load and those loads come from a few cache lines.
            sig = types.void(vals, voff, vrow, meta, moff, mrow, x, xoff, xblk, nblk, y, yoff, ystride)
            bf16_values = vals.dtype == types.int16

            def codegen(context, builder, signature, args):
                vals_, voff_, vrow_, meta_, moff_, mrow_, x_, xoff_, xblk_, nblk_, y_, yoff_, ystride_ = args
                sch = scheme(builder.module, bf16_values)

                def data(pos, value):
                    return context.make_array(signature.args[pos])(context, builder, value).data

                vptrs = [builder.gep(data(0, vals_), [builder.add(voff_, builder.mul(vrow_, c64(r)))]) for r in range(nr)]
                mptrs = [builder.gep(data(3, meta_), [builder.add(moff_, builder.mul(mrow_, c64(r)))]) for r in range(nr)]
                xstart, ybase = builder.gep(data(6, x_), [xoff_]), data(10, y_)
                zero = ir.Constant(v16f, [0.0] * 16)
                accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nb)] for _ in range(nr)]
                with cgutils.for_range(builder, nblk_) as loop:
                    i = loop.index
                    idxs = [sch.decode(builder, mptrs[r], i) for r in range(nr)]
                    ws = [sch.weights(builder, vptrs[r], i) for r in range(nr)]
                    xblock = builder.gep(xstart, [builder.mul(i, xblk_)])
                    for b in range(nb):
                        # constant offsets from one pointer: they fold into the addressing mode
                        lo, hi = sch.x_pair(builder, builder.gep(xblock, [c64(sch.blk * b)]))
                        for r in range(nr):
                            acc = builder.load(accs[r][b])
                            builder.store(sch.step(builder, acc, ws[r], idxs[r], lo, hi), accs[r][b])
                for b in range(nb):
                    sums = lane_sums(builder, [builder.load(accs[r][b]) for r in range(nr)])
                    for r in range(nr):
                        yp = builder.gep(ybase, [builder.add(builder.add(yoff_, c64(r)), builder.mul(ystride_, c64(b)))])
                        builder.store(builder.fadd(builder.load(yp), sums[r]) if accumulate else sums[r], yp)
                return context.get_dummy_value()

            return sig, codegen

        return dot

    def make_driver(scheme):
        # (batch rows, output rows) per call: 4x4 keeps 16 accumulators + 4 weights + 4 index
        # vectors + 2 x registers inside the 32 zmm registers; 1-row variants take leftover rows
        blk = scheme.blk

        def make_rows(nr):
            q4, q2, q1 = make_dot(scheme, 4, nr), make_dot(scheme, 2, nr), make_dot(scheme, 1, nr)

            @numba.njit(inline="always")
            def rows(vals, o, half, meta, row_bytes, nblk, x, xblk, y, O, B):
                # output rows o .. o+nr-1, every batch row, in chunks of 4, 2 and 1 batch rows
                b0 = 0
                while b0 + 4 <= B:
                    q4(vals, o * half, half, meta, o * row_bytes, row_bytes, x, b0 * blk, xblk, nblk, y, b0 * O + o, O)
                    b0 += 4
                if b0 + 2 <= B:
                    q2(vals, o * half, half, meta, o * row_bytes, row_bytes, x, b0 * blk, xblk, nblk, y, b0 * O + o, O)
                    b0 += 2
                if b0 < B:
                    q1(vals, o * half, half, meta, o * row_bytes, row_bytes, x, b0 * blk, xblk, nblk, y, b0 * O + o, O)

            return rows

        rows4, rows1 = make_rows(4), make_rows(1)

        def make_pass(nb, nr):
            dot = make_dot(scheme, nb, nr, accumulate=True)

            @numba.njit(inline="always")
            def tile_pass(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, b0, vaddr, maddr, vsize, pv, pvn, pm, pmn):
                # y += batch rows b0..b0+nb-1 of output rows o0..o1-1 (a multiple of nr), K in
                # chunks of _TILE_BLOCKS blocks, each chunk over every row of the tile before the
                # next: the chunk of x stays in L1 for the whole tile, the tile's weights in L2
                # across batch passes. How the weights get to L2 (the tiles read 2 KB pieces 4 KB
                # apart, an order the hardware prefetcher streams at about half the read rate):
                # - pvn > 0 (values) / pmn (index bytes): the next tile's bytes pv.. / pm.., which
                #   are contiguous, are asked for in address order, spread over this pass's calls,
                #   so this tile computes from L2 while the next one streams in;
                # - else, on the first pass, each row's chunk _TILE_AHEAD steps ahead (a 2x8
                #   thread's last tile, asked for by the one before, repeats them as L2 hits).
                ahead = nr * _TILE_AHEAD
                calls = (nblk + _TILE_BLOCKS - 1) // _TILE_BLOCKS * ((o1 - o0) // nr)
                pvstep = ((pvn + 63) // 64 + calls - 1) // calls * 64
                pmstep = ((pmn + 63) // 64 + calls - 1) // calls * 64
                pvend, pmend = pv + pvn, pm + pmn
                for c0 in range(0, nblk, _TILE_BLOCKS):
                    nc = min(_TILE_BLOCKS, nblk - c0)
                    voff, moff = c0 * (blk // 2), c0 * (blk // 8)
                    for o in range(o0, o1, nr):
                        if pvn > 0:
                            if pv < pvend:
                                prefetch_row(pv, min(pvstep, pvend - pv))
                                pv += pvstep
                            if pm < pmend:
                                prefetch_row(pm, min(pmstep, pmend - pm))
                                pm += pmstep
                        elif b0 == 0 and o + ahead < o1:
                            for r in range(o + ahead, o + ahead + nr):
                                prefetch_row(vaddr + (r * half + voff) * vsize, nc * (blk // 2) * vsize)
                                prefetch_row(maddr + r * row_bytes + moff, nc * (blk // 8))
                        dot(vals, o * half + voff, half, meta, o * row_bytes + moff, row_bytes,
                            x, c0 * xblk + b0 * blk, xblk, nc, y, b0 * O + o, O)

            return tile_pass

        def make_tile(nb, nr):
            # batch rows in chunks of nb, then 4 (if nb > 4), then one at a time
            main, one = make_pass(nb, nr), make_pass(1, nr)
            four = make_pass(4, nr) if nb > 4 else main

            @numba.njit(inline="always")
            def tile(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, B, vaddr, maddr, vsize, pv, pvn, pm, pmn):
                # the first pass asks for the next tile (pv, pvn, pm, pmn: see tile_pass)
                b0 = 0
                while b0 + nb <= B:
                    main(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, b0, vaddr, maddr, vsize, pv, pvn, pm, pmn)
                    pvn, pmn = 0, 0
                    b0 += nb
                if nb > 4 and b0 + 4 <= B:
                    four(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, b0, vaddr, maddr, vsize, pv, pvn, pm, pmn)
                    pvn, pmn = 0, 0
                    b0 += 4
                while b0 < B:
                    one(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, b0, vaddr, maddr, vsize, pv, pvn, pm, pmn)
                    pvn, pmn = 0, 0
                    b0 += 1

            return tile

        # measured (bf16, Llama-2 shapes, paired): 2 rows x 8 batch rows win at batch 8-10 (one
        # pass streams the weights with every x load shared by 2 rows; 4x4 there 0.92-1.09x),
        # 4x4 from batch 12 (1.04-1.13x over 2x8 at 12-20, with x padded) and at 32
        tile8x2, tile4x4 = make_tile(8, 2), make_tile(4, 4)

        rows4_b1 = not avx512_available()  # a compile-time constant (see below)

        def make(with_tiles):
            def driver(vals, meta, x, xt, y, O, K, B, bias):
                # vals (O*K/2,) f32|i16; meta (O*row_bytes,) uint8, 2-bit codes; y (B*O,) f32;
                # bias (O,) or (0,); x: the first nblk*blk inputs block-major,
                # x[(i*B + b)*blk + j] = x[b, i*blk + j]; xt (B*Kt,) f32: the Kt = K % blk tail inputs
                nblk = K // blk
                half = K // 2
                # x block stride, padded or not (see _block_major): x holds exactly nblk blocks
                xblk = x.shape[0] // nblk if nblk > 0 else 0
                row_bytes = (K // 2 * 2 + 7) // 8
                kt = K - nblk * blk
                vaddr, maddr, vsize = vals.ctypes.data, meta.ctypes.data, vals.itemsize
                # short rows (under 4 KB of kept values: MoE experts) read by several batch rows: the
                # 4 rows of a group span too few cache lines for the hardware prefetcher to ramp up,
                # so each group asks for the next group's bytes into L2. Measured (bf16, weights
                # streamed from DRAM): 5632x1024 at 4 rows 1.59x, 1024x2816 1.10x; at batch 1, or
                # with 4 KB rows, it cost 2-22%, so it is off there.
                pf = B > 1 and half * vsize < 4096
                # large layers at batch >= 8: row tiles with K chunked (make_pass); the rest by rows
                tiled = False
                ot = 0  # rows the tiles compute
                if with_tiles:  # a compile-time constant: the serial driver (small layers) has no tiles
                    tiled = B >= 8 and nblk > 0 and O * half * vsize >= _TILE_MIN_BYTES
                    nr = 2 if B < 12 else 4
                    if tiled:
                        ot = O // nr * nr
                    if tiled and nr == 2:
                        # one contiguous run of tiles per thread, each tile asking for the next
                        # (about _TILE_KB of weights each, so this tile and the next fit in L2);
                        # a thread's first tile is asked for whole before it starts
                        tr = max(4, min(_TILE_ROWS, (_TILE_KB << 10) // (half * vsize) // 4 * 4))
                        ntl = (ot + tr - 1) // tr
                        nw = min(numba.get_num_threads(), ntl)
                        for w in numba.prange(nw):
                            t_lo, t_hi = w * ntl // nw, (w + 1) * ntl // nw
                            for t in range(t_lo, t_hi):
                                o0, o1 = t * tr, min(t * tr + tr, ot)
                                if t == t_lo:
                                    prefetch_row(vaddr + o0 * half * vsize, (o1 - o0) * half * vsize)
                                    prefetch_row(maddr + o0 * row_bytes, (o1 - o0) * row_bytes)
                                n1 = min(o1 + tr, ot) if t + 1 < t_hi else o1
                                for b in range(B):  # the passes accumulate into y
                                    y[b * O + o0:b * O + o1] = 0.0
                                tile8x2(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, B, vaddr, maddr, vsize,
                                        vaddr + o1 * half * vsize, (n1 - o1) * half * vsize,
                                        maddr + o1 * row_bytes, (n1 - o1) * row_bytes)
                    elif tiled:
                        # 4x4 from batch 12: the tile's weights are read by several passes, the
                        # first one asks for them row by row (measured: the next-tile requests
                        # above were 0.92-1.09x here)
                        for t in numba.prange((ot + _TILE_ROWS - 1) // _TILE_ROWS):
                            o0, o1 = t * _TILE_ROWS, min(t * _TILE_ROWS + _TILE_ROWS, ot)
                            for b in range(B):
                                y[b * O + o0:b * O + o1] = 0.0
                            tile4x4(vals, o0, o1, half, meta, row_bytes, nblk, x, xblk, y, O, B, vaddr, maddr, vsize, 0, 0, 0, 0)
                for g in numba.prange((O + 3) // 4):
                    o0 = g * 4
                    if o0 + 4 <= ot:
                        pass  # the row tiles computed these rows (tail inputs and bias below)
                    elif o0 + 4 <= O and (B > 1 or rows4_b1) and not tiled:
                        if pf and o0 + 8 <= O:
                            prefetch_row(vaddr + (o0 + 4) * half * vsize, 4 * half * vsize)
                            prefetch_row(maddr + (o0 + 4) * row_bytes, 4 * row_bytes)
                        rows4(vals, o0, half, meta, row_bytes, nblk, x, xblk, y, O, B)
                    else:  # one row at a time: at batch 1 four weight streams per thread read slower
                        for o in range(max(o0, ot), min(o0 + 4, O)):
                            rows1(vals, o, half, meta, row_bytes, nblk, x, xblk, y, O, B)
                    for o in range(o0, min(o0 + 4, O)):
                        if kt > 0:  # groups after the last whole block: scalar
                            for b in range(B):
                                s = np.float32(0.0)
                                for j in range(nblk * blk // 2, half):
                                    code = (meta[o * row_bytes + (j >> 2)] >> (2 * (j & 3))) & 3
                                    col = (j >> 1) * 4 + code - nblk * blk
                                    s += weight_f32(vals[o * half + j]) * xt[b * kt + col]
                                y[b * O + o] += s
                        if bias.shape[0] > 0:
                            for b in range(B):
                                y[b * O + o] += bias[o]

            return driver

        # small layers skip the thread fork/join, which costs more than their work (and are too
        # small for row tiles: compiling those only into the parallel driver halves their cost).
        # Without AVX-512 (16 vector registers) the tiles' 16 accumulators of 2 registers each
        # took LLVM ~40 s to compile (the parallel driver without them: a few seconds); there the
        # parallel driver has none
        return numba.njit(parallel=True)(make(avx512_available())), numba.njit(parallel=False)(make(False))

    @intrinsic
    def weight_f32(typingctx, raw):
        # a kept value as fp32: int16 holds bf16 bits (the high half of the fp32 bits)
        sig = types.float32(raw)

        def codegen(context, builder, signature, args):
            if signature.args[0] == types.int16:
                wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
                return builder.bitcast(wide, f32)
            return args[0]

        return sig, codegen

    @numba.njit(parallel=True)
    def generic(vals, idx, x, y, O, K, B, bias, n, m, bits):
        # vals (O*NK,) f32|i16 ; idx (O*row_bytes,) uint8 bit stream ; x (B*K,) f32 ; y (B*O,)
        nk = K // m * n
        row_bytes = (nk * bits + 7) // 8
        mask = (1 << bits) - 1
        for o in numba.prange(O):
            bv = bias[o] if bias.shape[0] > 0 else np.float32(0.0)
            for b in range(B):  # batch outermost: no per-row scratch allocation
                acc = np.float32(0.0)
                for j in range(nk):
                    p = j * bits
                    byte = o * row_bytes + (p >> 3)
                    word = np.int64(idx[byte])
                    if (p & 7) + bits > 8:
                        word |= np.int64(idx[byte + 1]) << 8
                    col = (j // n) * m + ((word >> (p & 7)) & mask)
                    acc += weight_f32(vals[o * nk + j]) * x[b * K + col]
                y[b * O + o] = acc + bv

    return {"perm": make_driver(Perm), "dp": make_driver(Dp), "generic": generic}



@functools.lru_cache(maxsize=None)
def _compiled_decompress():
    # 2:4 -> dense, one 64-bit store per group of 4 outputs for 16-bit values (the two kept
    # values shifted to their positions, zeros elsewhere), four selects per group for 32-bit
    import numba

    def make16(parallel):
        @numba.njit(parallel=parallel)
        def expand16(vals, meta, out):
            # vals (R, K/2) uint16 ; meta (R, ceil(K/8)) uint8 ; out (R, K/4) uint64
            for r in numba.prange(out.shape[0]):
                for g in range(out.shape[1]):
                    code = (np.uint64(meta[r, g >> 1]) >> np.uint64(4 * (g & 1))) & np.uint64(15)
                    v0 = np.uint64(vals[r, 2 * g])
                    v1 = np.uint64(vals[r, 2 * g + 1])
                    out[r, g] = (v0 << (np.uint64(16) * (code & np.uint64(3)))) | \
                        (v1 << (np.uint64(16) * (code >> np.uint64(2))))
        return expand16

    def make32(parallel):
        @numba.njit(parallel=parallel)
        def expand32(vals, meta, out):
            # vals (R, K/2) uint32 ; meta (R, ceil(K/8)) uint8 ; out (R, K) uint32
            for r in numba.prange(out.shape[0]):
                for g in range(out.shape[1] // 4):
                    code = (meta[r, g >> 1] >> (4 * (g & 1))) & 15
                    i0, i1 = code & 3, code >> 2
                    v0, v1 = vals[r, 2 * g], vals[r, 2 * g + 1]
                    for c in range(4):
                        out[r, 4 * g + c] = v0 if c == i0 else (v1 if c == i1 else 0)
        return expand32

    return {16: (make16(True), make16(False)), 32: (make32(True), make32(False))}


def decompress_24(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A 2:4 weight's kept ``values`` (R, K/2) and index bytes (R, ceil(K/8)) -> dense (R, K), the
    same bits ``NMTensor.to_dense`` gives (pruned positions +0, NaN/Inf kept as stored), written
    into ``out`` when given (contiguous, same dtype). CPU, float32 / bfloat16 / float16. Bound by
    the bytes it writes (~100 GB/s in L2 for bf16 on the second development host), e.g. to run a
    batch-heavy product on torch's dense GEMM without keeping a dense copy."""
    if values.dim() != 2:
        raise ValueError(f"decompress_24 takes (rows, kept) values, got shape {tuple(values.shape)}")
    r, half = values.shape
    k = 2 * half
    size = values.element_size()
    if values.device.type != "cpu" or values.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"decompress_24 takes CPU float32/bfloat16/float16 values, got {values.dtype} on {values.device}")
    if k % 4 or indices.dtype != torch.uint8 or tuple(indices.shape) != (r, (k + 7) // 8):
        raise ValueError(f"2:4 values {tuple(values.shape)} need uint8 indices {(r, (k + 7) // 8)}, "
                         f"got {indices.dtype} {tuple(indices.shape)}")
    if out is None:
        out = torch.empty(r, k, dtype=values.dtype)
    elif out.shape != (r, k) or out.dtype != values.dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous CPU {values.dtype} tensor of shape {(r, k)}")
    if out.numel() == 0:
        return out
    vals = values.detach().contiguous()
    par, ser = _compiled_decompress()[8 * size]
    kern = ser if out.numel() * size < _SERIAL_BYTES else par
    meta = indices.contiguous().numpy()
    if size == 2:
        kern(vals.view(torch.int16).numpy().view(np.uint16), meta, out.view(torch.int64).numpy().view(np.uint64))
    else:
        kern(vals.view(torch.int32).numpy().view(np.uint32), meta, out.view(torch.int32).numpy().view(np.uint32))
    return out


def _as_kernel_values(values: torch.Tensor) -> np.ndarray:
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().reshape(-1)
    if values.dtype == torch.float32:
        return values.numpy().reshape(-1)
    raise TypeError(f"CPU N:M kernels take float32 or bfloat16 values, got {values.dtype}")


# bf16 2:4 weights run "dprows" (dprows.py) by default from batch ROWS_MIN_BATCH, and large
# (>= _ROWS_WIDE_MIN_BYTES packed, streamed from DRAM) wide or square ones (in >= out) from
# ROWS_MIN_BATCH_WIDE; "dp" below. Measured on Zen 5 with cold weights (copies cycled past the L3),
# one process, "dp" time / "dprows" time at batch 4-12: wide/square >= 2 MB 0.97-1.29 (Llama-2,
# TinyLlama, 1024x4096 shapes), tall (out > in) 0.91-1.08 (11008x4096, 5632x2048, 8192x4096),
# small 0.79-0.96 at batch 4-8 (576x576, 1024x1024, 1536x576); at batch 2 0.89-1.05.
ROWS_MIN_BATCH = 16
ROWS_MIN_BATCH_WIDE = 4
_ROWS_WIDE_MIN_BYTES = 2 << 20
_SERIAL_BYTES = 256 << 10  # below this many weight bytes one thread beats a parallel launch
_NO_BIAS = np.zeros(0, np.float32)


def _kernel_args(nmt, batch: int):
    # the default kernel for this batch, with numpy views sharing memory with the NMTensor
    # (in-place updates of the values stay visible), cached per kernel on the NMTensor with the
    # usable kernels and the batch from which "dprows" is the default
    cache = nmt._kernel_args
    if cache is None or cache[0] is not nmt.values:
        usable = available_kernels(nmt)
        first_rows = rows_min_batch(nmt) if "dprows" in usable else 1 << 62
        nmt._kernel_args = cache = (nmt.values, usable, {}, first_rows)
    usable, picked = cache[1], cache[2]
    name = "dprows" if batch >= cache[3] else usable[0]
    args = picked.get(name)
    if args is None:
        picked[name] = args = _select(nmt, name)
    return args


def rows_min_batch(nmt) -> int:
    """The batch from which "dprows" is the default kernel for this bf16 2:4 weight:
    ``ROWS_MIN_BATCH_WIDE`` for large weights with in_features >= out_features, else
    ``ROWS_MIN_BATCH``."""
    o, k = nmt.shape
    return ROWS_MIN_BATCH_WIDE if k >= o and nmt.nbytes >= _ROWS_WIDE_MIN_BYTES else ROWS_MIN_BATCH


def available_kernels(nmt) -> list[str]:
    """Kernels that can run this weight on this CPU. The default is the first below batch
    :func:`rows_min_batch` and "dprows" (bf16 2:4 weights) from it."""
    out = []
    if _dp_supported(nmt.values, nmt.shape[1]) and (nmt.n, nmt.m) == (2, 4):
        out += ["dp", "dprows"]
    if nm24_supported(nmt.n, nmt.m, nmt.shape[1]):
        out.append("perm")
    return out + ["generic"]


def _select(nmt, kernel: str | None):
    from .tensor import index_bits

    kernels = _compiled()
    usable = available_kernels(nmt)
    kernel = kernel or usable[0]
    if kernel not in usable:
        raise ValueError(f"kernel {kernel!r} cannot run this {nmt.n}:{nmt.m} {nmt.dtype} weight with "
                         f"in_features={nmt.shape[1]} on this CPU; usable: {usable}")
    vals = _as_kernel_values(nmt.values)
    idx = nmt.indices.numpy().reshape(-1)
    if kernel == "generic":
        kern = kernels["generic"]
        return kern, (vals, idx), (nmt.n, nmt.m, index_bits(nmt.m)), 0, torch.float32, None
    if kernel == "dprows":
        from .dprows import compiled as rows_compiled

        par, ser = rows_compiled()
        return (ser if nmt.nbytes < _SERIAL_BYTES else par), (vals, idx), (), 0, torch.bfloat16, None
    par, ser = kernels[kernel]
    kern = ser if nmt.nbytes < _SERIAL_BYTES else par
    groups = perm_x_groups() if kernel == "perm" else None
    xprep = None if groups is None else _compiled_xprep(groups)
    return kern, (vals, idx), (), (64 if kernel == "dp" else 32), (torch.bfloat16 if kernel == "dp" else torch.float32), xprep


@functools.lru_cache(maxsize=None)
def _compiled_xprep(groups: tuple):
    # (B, K) float32 -> the first nblk 32-input blocks block-major (block i's batch row b at
    # i*xblk + b*32), each block's 4-input groups in ``groups`` order (perm_x_groups)
    import numba

    @numba.njit
    def prep(x, nblk, xblk, out):
        for i in range(nblk):
            for b in range(x.shape[0]):
                dst, src = i * xblk + b * 32, i * 32
                for p in range(8):
                    g = groups[p]
                    for t in range(4):
                        out[dst + 4 * p + t] = x[b, src + 4 * g + t]

    return prep


def _block_major(xm: torch.Tensor, blk: int, padded: bool) -> torch.Tensor:
    """(B, nblk*blk) -> block-major rows, x[i*xblk + b*blk + j] = x[b, i*blk + j] (the driver
    reads xblk off the length); ``padded`` (large layers) adds one cache line after each block's B*blk
    values (xblk = B*blk + 64 bytes): a block's rows take an even number of lines, and with an odd
    stride in lines consecutive blocks fall on different L1 sets (at 4 KB strides, batch 32 bf16,
    a K chunk of x thrashed 16 of the 64 sets: 0.6x). Small layers skip the extra copy."""
    b, k = xm.shape
    nblk = k // blk
    if not padded:
        return xm.reshape(b, nblk, blk).transpose(0, 1).contiguous()
    pad = 64 // xm.element_size()
    buf = torch.empty(nblk, b * blk + pad, dtype=xm.dtype)
    buf[:, :b * blk].view(nblk, b, blk).copy_(xm.reshape(b, nblk, blk).transpose(0, 1))
    return buf


def nm_matmul(x2d: torch.Tensor, nmt, bias: torch.Tensor | None = None, *, kernel: str | None = None) -> torch.Tensor:
    """(B, K) float32 or bfloat16 @ W.T (+ bias) -> (B, O) float32, W an NMTensor (float32 or
    bf16 values), bias float32 (O,) or None.

    Inputs are assumed validated by the caller (``sparsewise.nm.functional``). ``kernel`` forces
    one of :func:`available_kernels` ("dp", "perm", "generic"); None picks the fastest.
    """
    o, k = nmt.shape
    b = x2d.shape[0]
    y = torch.empty(b, o, dtype=torch.float32)
    if b == 0 or o == 0:
        return y
    if kernel is None:
        kern, (vals, idx), extra, blk, xdtype, xprep = _kernel_args(nmt, b)
    else:
        kern, (vals, idx), extra, blk, xdtype, xprep = _select(nmt, kernel)
    bias_arg = _NO_BIAS if bias is None else bias.numpy()
    if not blk:  # row-major x: fp32 for "generic", bf16 bits for "dprows"
        xr = x2d.to(xdtype).contiguous()
        xv = (xr.view(torch.int16) if xdtype == torch.bfloat16 else xr).numpy().reshape(-1)
        kern(vals, idx, xv, y.numpy().reshape(-1), o, k, b, bias_arg, *extra)
        return y
    kmain = k // blk * blk
    if xprep is not None:
        # AVX2 "perm": block-major, each block's inputs in the order the kernel reads them;
        # unpadded (the padding is for the row tiles, which are AVX-512 only)
        xv = np.empty(b * kmain, np.float32)
        xprep(x2d.to(torch.float32).contiguous().numpy(), kmain // blk, b * blk, xv)
    else:
        xm = x2d[:, :kmain] if kmain < k else x2d
        if xm.dtype != xdtype:
            xm = xm.to(xdtype)
        padded = nmt.values.numel() * nmt.values.element_size() >= _TILE_MIN_BYTES
        xm = _block_major(xm, blk, padded) if b > 1 else xm.contiguous()
        xv = xm.view(torch.int16).numpy().reshape(-1) if xdtype == torch.bfloat16 else xm.numpy().reshape(-1)
    # the tail sees x as the vector part does (bf16-rounded for "dp"), in fp32
    xt = x2d[:, kmain:].to(xdtype).to(torch.float32).contiguous().numpy().reshape(-1) if kmain < k else _NO_BIAS
    kern(vals, idx, xv, xt, y.numpy().reshape(-1), o, k, b, bias_arg)
    return y


def reference_matmul(x2d: torch.Tensor, nmt) -> torch.Tensor:
    """Pure-torch oracle: decompress and multiply in float32."""
    return x2d.to(torch.float32) @ nmt.scatter_dense().to(torch.float32).T
