"""cryoprior.networks"""
