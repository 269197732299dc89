"""CPU kernels for y = x @ W.T with W in packed N:M form (see tensor.py for the layout).

Legend: B = batch rows of x, K = in_features, O = out_features, NK = kept values per row,
b = index bits. All arrays are flat, C-contiguous: x (B*K,) float32, y (B*O,) float32,
vals (O*NK,) float32 or int16 (bf16 bit patterns), meta/indices the packed index bytes.

Two kernels:
- ``nm24_matmul``: 2:4 with K % 32 == 0 on AVX-512. Per row and per 32 inputs it loads 16 kept
  values and one uint32 of indices, turns the indices into a permutation (broadcast, shift, mask,
  add group base) and picks the matching x values with one ``vpermi2ps`` from two registers,
  then one FMA. Weights are read once per 8 batch rows; bf16 values are widened in registers.
  Written as LLVM IR through numba intrinsics because numba cannot express the permute.
- ``nm_matmul_generic``: any N:M, any K, scalar numba; the fallback and the non-2:4 path.

Both are checked against the pure-torch reference ``reference_matmul`` in the tests.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["avx512_available", "nm24_supported", "nm_matmul", "reference_matmul"]


@functools.lru_cache(maxsize=1)
def avx512_available() -> bool:
    """True when the CPU has AVX-512F (the 2:4 permute kernel needs it)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def nm24_supported(n: int, m: int, k: int) -> bool:
    return n == 2 and m == 4 and k % 32 == 0 and avx512_available()


@functools.lru_cache(maxsize=None)
def _compiled():
    # Built on first use: importing sparsewise.nm compiles nothing.
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    f32, i16, i32, i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    v16f, v16i, v16s = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(i16, 16)

    def c64(v):
        return ir.Constant(i64, v)

    def widen_bf16(builder, raw16):
        # bf16 bits -> fp32: the bf16 pattern is the high half of the fp32 pattern
        return builder.bitcast(builder.shl(builder.zext(raw16, v16i), ir.Constant(v16i, [16] * 16)), v16f)

    def make_dot24(nb: int, nr: int):
        @intrinsic
        def dot24(typingctx, vals, voff, vrow, meta, moff, x, xoff, xblk, nblk, y, yoff, ystride):
            # For rows r < nr and batch rows b < nb:
            #   y[yoff + r + b*ystride] = sum_i vals[voff + r*vrow + 16i : +16] . x[xoff + i*xblk + 32b + perm(r, i)]
            # x is block-major (the batch rows of one 32-input block are 32 floats apart), so the nr
            # rows share every x load: x comes from L2 once per nr rows, not once per row.
            sig = types.void(vals, voff, vrow, meta, moff, x, xoff, xblk, nblk, y, yoff, ystride)
            is_bf16 = vals.dtype == types.int16

            def codegen(context, builder, signature, args):
                vals_, voff_, vrow_, meta_, moff_, x_, xoff_, xblk_, nblk_, y_, yoff_, ystride_ = args
                mod = builder.module

                def data(pos, value):
                    return context.make_array(signature.args[pos])(context, builder, value).data

                vptrs = [builder.gep(data(0, vals_), [builder.add(voff_, builder.mul(vrow_, c64(r)))]) for r in range(nr)]
                mptrs = [builder.gep(data(3, meta_), [builder.add(moff_, builder.mul(nblk_, c64(r)))]) for r in range(nr)]
                xstart, ybase = builder.gep(data(5, x_), [xoff_]), data(9, y_)
                perm = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(v16f, [v16f, v16i, v16f]), "llvm.x86.avx512.vpermi2var.ps.512")
                fma = cgutils.get_or_insert_function(mod, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
                zero = ir.Constant(v16f, [0.0] * 16)
                accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nb)] for _ in range(nr)]
                shifts = ir.Constant(v16i, [2 * k for k in range(16)])
                base = ir.Constant(v16i, [(k // 2) * 4 for k in range(16)])
                three = ir.Constant(v16i, [3] * 16)
                with cgutils.for_range(builder, nblk_) as loop:
                    i = loop.index
                    idxs, ws = [], []
                    for r in range(nr):
                        # 16 two-bit positions -> permutation indices into the block's 32 inputs
                        word = builder.bitcast(builder.load(builder.gep(mptrs[r], [i])), i32)
                        wv = builder.insert_element(ir.Constant(v16i, ir.Undefined), word, ir.Constant(i32, 0))
                        wv = builder.shuffle_vector(wv, ir.Constant(v16i, ir.Undefined), ir.Constant(v16i, [0] * 16))
                        idxs.append(builder.add(builder.and_(builder.lshr(wv, shifts), three), base))
                        wp = builder.gep(vptrs[r], [builder.mul(i, c64(16))])
                        if is_bf16:
                            ws.append(widen_bf16(builder, builder.load(builder.bitcast(wp, v16s.as_pointer()), align=2)))
                        else:
                            ws.append(builder.load(builder.bitcast(wp, v16f.as_pointer()), align=4))
                    xblock = builder.gep(xstart, [builder.mul(i, xblk_)])
                    for b in range(nb):
                        # constant offsets from one pointer: they fold into the addressing mode
                        xp = builder.gep(xblock, [c64(32 * b)])
                        lo = builder.load(builder.bitcast(xp, v16f.as_pointer()), align=4)
                        hi = builder.load(builder.bitcast(builder.gep(xp, [c64(16)]), v16f.as_pointer()), align=4)
                        for r in range(nr):
                            picked = builder.call(perm, [lo, idxs[r], hi])
                            builder.store(builder.call(fma, [ws[r], picked, builder.load(accs[r][b])]), accs[r][b])
                for r in range(nr):
                    for b in range(nb):
                        acc = builder.load(accs[r][b])
                        # pairwise tree sum of the 16 lanes
                        lanes = [builder.extract_element(acc, ir.Constant(i32, k)) for k in range(16)]
                        while len(lanes) > 1:
                            lanes = [builder.fadd(lanes[j], lanes[j + 1]) for j in range(0, len(lanes), 2)]
                        yp = builder.gep(ybase, [builder.add(builder.add(yoff_, c64(r)), builder.mul(ystride_, c64(b)))])
                        builder.store(lanes[0], yp)
                return context.get_dummy_value()

            return sig, codegen

        return dot24

    @intrinsic
    def bf16_to_f32(typingctx, raw):
        sig = types.float32(raw)

        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
            return builder.bitcast(wide, f32)

        return sig, codegen

    # (batch rows, output rows) per call: 4x4 keeps 16 accumulators + 4 weights + 4 permutations +
    # 2 x registers inside the 32 zmm registers; the 1-row variants take the rows left over
    q44, q24, q14 = make_dot24(4, 4), make_dot24(2, 4), make_dot24(1, 4)
    q41, q21, q11 = make_dot24(4, 1), make_dot24(2, 1), make_dot24(1, 1)

    def nm24_matmul_py(vals, meta, x, y, O, K, B, bias):
        # vals (O*K/2,) f32|i16; meta (O*K/32,) int32; y (B*O,) f32; bias (O,) or (0,)
        # x (B*K,) f32 in block-major order: x[(i*B + b)*32 + j] = x[b, i*32 + j]
        nblk = K // 32
        half = K // 2
        xblk = B * 32
        groups = (O + 3) // 4
        for g in numba.prange(groups):
            o0 = g * 4
            if o0 + 4 <= O and B > 1:
                b0 = 0
                while b0 + 4 <= B:
                    q44(vals, o0 * half, half, meta, o0 * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o0, O)
                    b0 += 4
                if b0 + 2 <= B:
                    q24(vals, o0 * half, half, meta, o0 * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o0, O)
                    b0 += 2
                if b0 < B:
                    q14(vals, o0 * half, half, meta, o0 * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o0, O)
            else:
                for o in range(o0, min(o0 + 4, O)):
                    b0 = 0
                    while b0 + 4 <= B:
                        q41(vals, o * half, half, meta, o * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o, O)
                        b0 += 4
                    if b0 + 2 <= B:
                        q21(vals, o * half, half, meta, o * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o, O)
                        b0 += 2
                    if b0 < B:
                        q11(vals, o * half, half, meta, o * nblk, x, b0 * 32, xblk, nblk, y, b0 * O + o, O)
            if bias.shape[0] > 0:
                for o in range(o0, min(o0 + 4, O)):
                    for b in range(B):
                        y[b * O + o] += bias[o]

    # small layers skip the thread fork/join, which costs more than the work
    nm24_parallel = numba.njit(parallel=True)(nm24_matmul_py)
    nm24_serial = numba.njit(parallel=False)(nm24_matmul_py)

    def make_generic(is_bf16: bool):
        @numba.njit(parallel=True, fastmath=False, cache=False)
        def generic(vals, idx, x, y, O, K, B, bias, n, m, bits):
            # vals (O*NK,) ; idx (O*row_bytes,) uint8 bit stream ; x (B*K,) ; y (B*O,)
            nk = K // m * n
            row_bytes = (nk * bits + 7) // 8
            mask = (1 << bits) - 1
            for o in numba.prange(O):
                acc = np.zeros(B, np.float32)
                for j in range(nk):
                    p = j * bits
                    byte = o * row_bytes + (p >> 3)
                    word = np.int64(idx[byte])
                    if (p & 7) + bits > 8:
                        word |= np.int64(idx[byte + 1]) << 8
                    col = (j // n) * m + ((word >> (p & 7)) & mask)
                    if is_bf16:
                        w = bf16_to_f32(vals[o * nk + j])
                    else:
                        w = vals[o * nk + j]
                    for b in range(B):
                        acc[b] += w * x[b * K + col]
                bv = bias[o] if bias.shape[0] > 0 else np.float32(0.0)
                for b in range(B):
                    y[b * O + o] = acc[b] + bv

        return generic

    return (nm24_parallel, nm24_serial), make_generic(False), make_generic(True)


def _as_kernel_values(values: torch.Tensor) -> np.ndarray:
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().reshape(-1)
    if values.dtype == torch.float32:
        return values.numpy().reshape(-1)
    raise TypeError(f"CPU N:M kernels take float32 or bfloat16 values, got {values.dtype}")


_SERIAL_BYTES = 256 << 10  # below this many weight bytes one thread beats a parallel launch
_NO_BIAS = np.zeros(0, np.float32)


def _kernel_args(nmt):
    # numpy views sharing memory with the NMTensor (in-place updates of the values stay visible)
    args = nmt._kernel_args
    if args is None or args[0] is not nmt.values:
        nmt._kernel_args = args = (nmt.values,) + _select(nmt, None)
    return args


def _select(nmt, use_fast):
    from .tensor import index_bits

    (nm24_par, nm24_ser), gen_f32, gen_bf16 = _compiled()
    vals = _as_kernel_values(nmt.values)
    fast = nm24_supported(nmt.n, nmt.m, nmt.shape[1]) if use_fast is None else use_fast
    if fast:
        kern = nm24_ser if nmt.nbytes < _SERIAL_BYTES else nm24_par
        return kern, (vals, nmt.indices.numpy().reshape(-1).view(np.int32)), ()
    kern = gen_bf16 if nmt.values.dtype == torch.bfloat16 else gen_f32
    return kern, (vals, nmt.indices.numpy().reshape(-1)), (nmt.n, nmt.m, index_bits(nmt.m))


def nm_matmul(x2d: torch.Tensor, nmt, bias: torch.Tensor | None = None, *, use_fast: bool | None = None) -> torch.Tensor:
    """(B, K) float32 contiguous @ W.T (+ bias) -> (B, O) float32, W an NMTensor (float32 or
    bf16 values), bias float32 (O,) or None.

    Inputs are assumed validated by the caller (``sparsewise.nm.functional``). ``use_fast``
    forces (True) or forbids (False) the AVX-512 2:4 kernel; None picks it where it applies.
    """
    o, k = nmt.shape
    b = x2d.shape[0]
    y = torch.empty(b, o, dtype=torch.float32)
    if b == 0 or o == 0:
        return y
    if use_fast is None:
        _, kern, (vals, idx), extra = _kernel_args(nmt)
    else:
        kern, (vals, idx), extra = _select(nmt, use_fast)
    bias_np = _NO_BIAS if bias is None else bias.numpy()
    if not extra and b > 1:  # the 2:4 kernel reads x block-major (see nm24_matmul_py)
        x2d = x2d.reshape(b, k // 32, 32).transpose(0, 1).contiguous()
    kern(vals, idx, x2d.numpy().reshape(-1), y.numpy().reshape(-1), o, k, b, bias_np, *extra)
    return y


def reference_matmul(x2d: torch.Tensor, nmt) -> torch.Tensor:
    """Pure-torch oracle: decompress and multiply in float32."""
    return x2d.to(torch.float32) @ nmt.to_dense().to(torch.float32).T
