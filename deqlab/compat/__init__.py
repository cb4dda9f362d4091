"""Other DEQ libraries behind deqlab's interfaces: :mod:`deqlab.compat.torchdeq`
(``core=torchdeq``, TorchDEQ computing the solve behind the same call and statistics)."""
