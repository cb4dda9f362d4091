"""Graphs: implicit graph neural networks (IGNN) and their finite-depth baselines."""
