"""cryoprior.diffusion"""
