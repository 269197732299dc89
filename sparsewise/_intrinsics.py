"""numba intrinsics shared by the CPU kernels (built on first use: importing this compiles nothing)."""
from __future__ import annotations

import functools

__all__ = ["cpu_flags", "bf16_dot_available", "emit_prefetch_l2", "lane_sums", "prefetch_l2", "prefetch_row",
           "bfloat_type"]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags of this machine (from /proc/cpuinfo; empty if unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_dot_available() -> bool:
    """True when the CPU runs ``vdpbf16ps`` on 512-bit vectors (AVX-512 BF16 and BW): the 2:4, MoE
    and embedding kernels' bf16 paths."""
    return {"avx512bw", "avx512_bf16"} <= cpu_flags()


def emit_prefetch_l2(builder, addr, locality: int = 2) -> None:
    """Emit, inside an intrinsic's codegen, ``prefetcht1`` of the cache line at ``addr`` (an i64
    address), or ``prefetcht0`` (into L1) with ``locality=3``: the one place the kernels spell
    LLVM's prefetch call."""
    from llvmlite import ir
    from numba.core import cgutils

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    # (address, read, locality 2 = prefetcht1 / 3 = prefetcht0, data cache)
    builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])


@functools.lru_cache(maxsize=None)
def prefetch_l2():
    """An intrinsic ``prefetch_l2(addr: int64)``: ``prefetcht1`` of the cache line at ``addr``, into
    L2. Measured here (Zen 4, random 512 B rows): L2 beats L1 (``prefetcht0``), as L1's few miss
    buffers cap the misses in flight."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, addr):
        sig = types.void(types.int64)

        def codegen(context, builder, signature, args):
            emit_prefetch_l2(builder, args[0])
            return context.get_dummy_value()

        return sig, codegen

    return prefetch


@functools.lru_cache(maxsize=None)
def prefetch_row():
    """A jitted ``prefetch_row(addr: int64, nbytes: int64)``: :func:`prefetch_l2` of every cache
    line of the ``nbytes`` starting at ``addr`` (inlined into the caller)."""
    import numba
    import numpy as np

    prefetch = prefetch_l2()

    @numba.njit(inline="always", nogil=True)
    def row(addr, nbytes):
        a = addr & ~np.int64(63)
        last = (addr + nbytes - 1) & ~np.int64(63)
        while a <= last:
            prefetch(a)
            a += 64

    return row


def lane_sums(builder, vecs):
    """Emit, inside an intrinsic's codegen, the lane sums of 1 to 4 ``<16 x float>`` values as
    scalars. Each step folds every vector's live lanes in half and packs two vectors into one
    register: ~14 vector ops for 4 vectors, where 16 lane extracts and 15 scalar adds per vector
    (or LLVM's ordered ``vector.reduce.fadd``, a 16-add dependency chain) take ~31 each."""
    from llvmlite import ir

    i32, v16f = ir.IntType(32), ir.VectorType(ir.FloatType(), 16)
    if not 1 <= len(vecs) <= 4:
        raise ValueError(f"lane_sums takes 1 to 4 vectors, got {len(vecs)}")

    def shuf(a, b, lanes):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, len(lanes)), lanes))

    if len(vecs) == 1:
        v, n = vecs[0], 16
        while n > 1:
            n //= 2
            v = builder.fadd(shuf(v, v, list(range(n))), shuf(v, v, list(range(n, 2 * n))))
        return [builder.extract_element(v, ir.Constant(i32, 0))]
    v = list(vecs) + [ir.Constant(v16f, [0.0] * 16)] * (4 - len(vecs))
    # lanes 0-7: a folded to 8 lanes, 8-15: b folded to 8 lanes (the same for c, d)
    ab = builder.fadd(shuf(v[0], v[1], list(range(8)) + list(range(16, 24))),
                      shuf(v[0], v[1], list(range(8, 16)) + list(range(24, 32))))
    cd = builder.fadd(shuf(v[2], v[3], list(range(8)) + list(range(16, 24))),
                      shuf(v[2], v[3], list(range(8, 16)) + list(range(24, 32))))
    # 4 lanes each: a in 0-3, b in 4-7, c in 8-11, d in 12-15; then the sums within each 4
    q = builder.fadd(shuf(ab, cd, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]),
                     shuf(ab, cd, [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]))
    q = builder.fadd(q, shuf(q, q, [j ^ 2 for j in range(16)]))
    q = builder.fadd(q, shuf(q, q, [j ^ 1 for j in range(16)]))
    return [builder.extract_element(q, ir.Constant(i32, 4 * r)) for r in range(len(vecs))]


@functools.lru_cache(maxsize=None)
def bfloat_type():
    """LLVM's ``bfloat`` element type for llvmlite IR (llvmlite has none; LLVM's vdpbf16ps
    intrinsic ``llvm.x86.avx512bf16.dpbf16ps.512`` takes ``<32 x bfloat>`` operands)."""
    from llvmlite import ir

    class BFloat(ir.Type):
        def _to_string(self):
            return "bfloat"

        def __eq__(self, other):
            return isinstance(other, BFloat)

        def __hash__(self):
            return hash("bfloat")

    return BFloat()
