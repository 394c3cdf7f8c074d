"""cryoprior.io"""
