"""cryoprior.train"""
