"""Roofline arithmetic: where each kind of zero sits against this machine's measured limits.

Arithmetic intensity I = FLOPs / bytes moved. Attainable FLOP/s = min(peak, I * bandwidth).
The three kinds of zeros sit at very different I, which is the article's point: they need
different machines.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Workload", "reference_workloads", "attainable_gflops"]


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "embedding" | "nm" | "moe" | "dense"
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def attainable_gflops(intensity: float, bandwidth_gbs: float, peak_gflops: float) -> float:
    """Roofline bound in GFLOP/s for a kernel of the given FLOP/byte intensity."""
    if intensity <= 0 or bandwidth_gbs <= 0 or peak_gflops <= 0:
        raise ValueError("intensity, bandwidth and peak must be > 0")
    return min(peak_gflops, intensity * bandwidth_gbs)


def reference_workloads() -> list[Workload]:
    """Representative fp32 operations for each kind of zero (shapes from the issues' workloads)."""
    f32 = 4.0
    out: list[Workload] = []
    # embedding: sum-pool 32 rows of dim 128 per bag: one add per 4 bytes read
    b, l, d = 8192, 32, 128
    out.append(Workload("embedding bag, fp32 rows", "embedding", b * l * d, b * l * d * f32))
    # dense GEMV and 2:4 GEMV, Llama-2-7B MLP up projection, batch 1
    o, i = 11008, 4096
    out.append(Workload("dense GEMV 11008x4096, batch 1", "dense", 2.0 * o * i, o * i * f32))
    kept = o * i / 2
    out.append(Workload("2:4 GEMV 11008x4096, batch 1", "nm", 2.0 * kept, kept * f32 + kept * 2 / 8))
    out.append(Workload("dense GEMM 11008x4096, batch 256", "dense", 2.0 * o * i * 256,
                        (o * i + 256 * (o + i)) * f32))
    # MoE decode: Mixtral-shaped scaled (D=1024, H=2816, E=8, k=2), 16 tokens touch ~all experts
    dm, h, e, t, k = 1024, 2816, 8, 16, 2
    flops = t * k * 3 * 2.0 * dm * h
    out.append(Workload("MoE decode, 16 tokens, E=8 k=2", "moe", flops, e * 3 * dm * h * f32))
    return out
