"""Implicit neural representations: coordinates to pixel values, fitted by an equilibrium
network ((Implicit)^2, Huang, Bai and Kolter, NeurIPS 2021) or an explicit baseline."""
