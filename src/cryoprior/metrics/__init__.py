"""cryoprior.metrics"""
