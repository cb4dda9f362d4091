"""Inverse problems in imaging: deep equilibrium reconstruction (Gilton et al., 2021)."""
