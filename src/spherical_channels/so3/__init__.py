"""SO(3) maths for SCN: real spherical harmonics, Wigner-D matrices, edge frames, spherical grids."""
