"""cryoprior.networks: raw denoiser networks (U-Net, EGNN, MLP) and their registry.

Every network is called as ``net(x, c_noise, **cond)`` and returns a tensor of ``x``'s
shape; a Denoiser (``cryoprior.diffusion``) interprets it as ε, x0 or v.
"""

from cryoprior.networks.egnn import EGNN
from cryoprior.networks.embeddings import ConditionEmbedding, SinusoidalEmbedding
from cryoprior.networks.mlp import MLP
from cryoprior.networks.registry import (
    NETWORKS,
    build_network,
    network_config,
    register_network,
)
from cryoprior.networks.unet import UNet

__all__ = [
    "EGNN",
    "MLP",
    "NETWORKS",
    "ConditionEmbedding",
    "SinusoidalEmbedding",
    "UNet",
    "build_network",
    "network_config",
    "register_network",
]
