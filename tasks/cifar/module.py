"""CIFAR-10 LightningModule: the shared classifier (cross-entropy, top-1 accuracy)."""

from __future__ import annotations

from deqlab.runner.classify import ClassificationModule


class CifarModule(ClassificationModule):
    """Cross-entropy and top-1 accuracy over CIFAR-10's classes (``train/acc``, ``val/acc``,
    ``test/acc``); run folders name this class, so it keeps its name."""
