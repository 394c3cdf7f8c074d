"""cryoprior.data"""
