"""M-IDoL's objectives, one per file, and the official combination of them."""

from .dino import DINOLoss
from .koleo import KoLeoLoss
from .midol import MIDoLLoss
from .preserve import FeaturePreservationLoss
from .routing import ROUTING_FORMS, RoutingLoss, sinkhorn_knopp

__all__ = ["DINOLoss", "FeaturePreservationLoss", "KoLeoLoss", "MIDoLLoss", "ROUTING_FORMS", "RoutingLoss", "sinkhorn_knopp"]
