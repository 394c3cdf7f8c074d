"""Layer 1: rotations, centred grids and frequency shells, centred FFTs.

Conventions (pinned by tests): arrays are [z, y, x] (volumes) and [y, x] (images);
coordinate vectors are (x, y, z); the origin is index N//2 on every axis.
"""
