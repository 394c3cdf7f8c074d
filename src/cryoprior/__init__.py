"""cryoprior: learned diffusion priors for cryo-EM and 3D structure recovery.

Layers (each imports only the ones before it): core, geometry, io, metrics, physics,
diffusion, networks, priors, data, train, solvers, cli. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
