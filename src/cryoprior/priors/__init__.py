"""cryoprior.priors"""
