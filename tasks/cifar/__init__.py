"""CIFAR-10 image classification with DEQs."""
