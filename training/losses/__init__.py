"""M-IDoL's two objectives, one per file."""

from .dino import DINOLoss
from .routing import RoutingConsistencyLoss, sinkhorn_knopp

__all__ = ["DINOLoss", "RoutingConsistencyLoss", "sinkhorn_knopp"]
