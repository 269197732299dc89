"""Mixture-of-Experts: routers, dropless grouped expert compute, capacity mode, 2:4 experts.

>>> import torch
>>> from sparsewise.moe import MoE, RouterConfig
>>> moe = MoE(64, 128, num_experts=8, top_k=2)
>>> moe(torch.randn(3, 64)).shape
torch.Size([3, 64])
"""
from .experts import Experts, uniform_plan
from .kernels import grouped_matvec, reference_moe
from .layer import MoE, MoEConfig, hf_available
from .routing import (Router, RouterConfig, RoutingPlan, build_plan, capacity_keep_mask, expert_capacity,
                      load_balancing_loss, router_z_loss)

__all__ = ["MoE", "MoEConfig", "Router", "RouterConfig", "RoutingPlan", "Experts", "build_plan",
           "load_balancing_loss", "router_z_loss", "capacity_keep_mask", "expert_capacity", "uniform_plan",
           "grouped_matvec", "reference_moe", "hf_available"]
