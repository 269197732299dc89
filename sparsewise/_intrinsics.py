"""numba intrinsics shared by the CPU kernels (built on first use: importing this compiles nothing)."""
from __future__ import annotations

import functools

__all__ = ["emit_prefetch_l2", "prefetch_l2", "prefetch_row", "bfloat_type"]


def emit_prefetch_l2(builder, addr) -> None:
    """Emit, inside an intrinsic's codegen, ``prefetcht1`` of the cache line at ``addr`` (an i64
    address): the one place the kernels spell LLVM's prefetch call."""
    from llvmlite import ir
    from numba.core import cgutils

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    # (address, read, locality 2 = prefetcht1, data cache)
    builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])


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
