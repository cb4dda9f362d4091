"""Forward operators y = A x + noise from DeepInverse (``deepinv``, the extra
``deqlab[imaging]``), checked by name before any training starts.

``make_physics`` builds one of:

- ``blur``: Gaussian deblurring with ``deepinv``'s Gaussian kernel of standard deviation
  ``blur_sigma`` pixels (of deepinv's size for it, or ``kernel_size``): with
  ``padding="circular"``, ``deepinv.physics.BlurFFT`` (A^T A and the proximal step exact in
  Fourier space); with another of deepinv's paddings (``constant``: zeros beyond the border,
  as Gilton et al.'s code convolves), ``deepinv.physics.Blur``, whose proximal step is
  deepinv's conjugate gradient;
- ``downsampling``: super-resolution by ``factor``, ``deepinv.physics.Downsampling``
  (an anti-aliasing ``filter``, then every factor-th pixel);

each with ``deepinv.physics.GaussianNoise`` of standard deviation ``noise_sigma``, seeded per
measurement so that a data set of measurements is a function of its seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KINDS = ("blur", "downsampling")


class OperatorError(ValueError):
    """An operator or a measurement the reconstruction cannot use, named with the fix."""


def make_physics(
    kind: str,
    image_size: tuple[int, int, int],
    *,
    blur_sigma: float = 1.0,
    kernel_size: int | None = None,
    padding: str = "circular",
    factor: int = 2,
    filter: str = "bicubic",
    noise_sigma: float = 0.01,
    noise: bool = True,
) -> Any:
    """The operator ``kind`` on images of ``image_size`` (C, H, W), with its noise.

    Args:
        kind: ``blur`` or ``downsampling``.
        image_size: (channels, height, width) of the clean images.
        blur_sigma: the Gaussian kernel's standard deviation in pixels (``blur``).
        kernel_size: the kernel's odd side, truncated and renormalized to sum 1; None: the
            size deepinv gives ``blur_sigma``.
        padding: the blur's boundary: ``circular`` or one of deepinv's paddings
            (``constant``, ``reflect``, ``replicate``).
        factor: the downsampling factor; it must divide the height and width.
        filter: the anti-aliasing filter of ``downsampling`` (deepinv's names).
        noise_sigma: the measurement noise's standard deviation (images in [0, 1]).
        noise: add it (the data's operator); a network's copy of A needs none.

    Returns:
        A ``deepinv.physics.LinearPhysics``.
    """
    import deepinv

    if kind not in KINDS:
        raise OperatorError(f"unknown operator {kind!r}: task.operator.kind is one of {KINDS}")
    if noise_sigma < 0:
        raise OperatorError(
            f"task.operator.noise_sigma={noise_sigma}: a noise level is a standard deviation, >= 0"
        )
    _, height, width = image_size
    # seeded per measurement (physics(x, seed=...)); without noise, deepinv's default (none)
    extra = {"noise_model": deepinv.physics.GaussianNoise(noise_sigma, rng=torch.Generator())}
    extra = extra if noise else {}
    if kind == "blur":
        return _blur(image_size, blur_sigma, kernel_size, padding, extra)
    if factor < 1 or height % factor or width % factor:
        raise OperatorError(
            f"task.operator.factor={factor} must divide the image size {height}x{width}"
        )
    return deepinv.physics.Downsampling(
        image_size, filter=filter, factor=factor, padding="circular", **extra
    )


PADDINGS = ("circular", "constant", "reflect", "replicate")


def _blur(
    image_size: tuple[int, int, int],
    sigma: float,
    kernel_size: int | None,
    padding: str,
    extra: dict[str, Any],
) -> Any:
    import deepinv
    from deepinv.physics.functional import gaussian_blur

    _, height, width = image_size
    if not sigma > 0:
        raise OperatorError(f"task.operator.blur_sigma={sigma} must be > 0")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise OperatorError(f"task.operator.kernel_size={kernel_size} must be odd and >= 1")
    if padding not in PADDINGS:
        raise OperatorError(
            f"unknown padding {padding!r}: task.operator.padding is one of {PADDINGS}"
        )
    psf_size = None if kernel_size is None else (kernel_size, kernel_size)
    kernel = gaussian_blur(psf_size=psf_size, sigma=(sigma, sigma))
    size = kernel.shape[-1]
    if size > min(height, width):
        raise OperatorError(
            f"the blur kernel is {size}x{size} (blur_sigma={sigma}), larger than the "
            f"{height}x{width} images: lower task.operator.blur_sigma or kernel_size"
        )
    if padding == "circular":
        return deepinv.physics.BlurFFT(image_size, filter=kernel, **extra)
    # its proximal step (DE-Prox, the ridge start) is conjugate gradient: to 1e-6, not 1e-4
    return deepinv.physics.Blur(filter=kernel, padding=padding, max_iter=100, tol=1e-6, **extra)


def check_measurement(physics: Any, y: Tensor, image_size: tuple[int, int, int]) -> None:
    """Refuse a measurement the operator cannot have produced: a wrong shape, or non-finite
    values (a reconstruction would spread them over the whole image)."""
    zero = torch.zeros(1, *image_size, device=y.device, dtype=y.dtype)
    expected = tuple(physics.A(zero).shape[1:])
    if tuple(y.shape[1:]) != expected:
        raise OperatorError(
            f"measurements of shape {tuple(y.shape[1:])}, the operator gives {expected} for "
            f"{image_size} images: the data and task.operator disagree"
        )
    if not bool(torch.isfinite(y).all()):
        bad = int((~torch.isfinite(y)).flatten(1).any(1).sum())
        raise OperatorError(f"{bad} measurement(s) hold NaN or inf values: check the data")
