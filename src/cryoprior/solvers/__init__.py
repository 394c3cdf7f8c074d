"""cryoprior.solvers"""
