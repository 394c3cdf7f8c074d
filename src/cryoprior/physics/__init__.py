"""cryoprior.physics"""
