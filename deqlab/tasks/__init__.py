"""The task packages, one per task with its data, model and LightningModule:
``deqlab.tasks.cifar`` (CIFAR-10: tutorial DEQ, MDEQ), ``deqlab.tasks.lm`` (word-level
language modeling: DEQ-Transformer), ``deqlab.tasks.graph`` (implicit graph networks),
``deqlab.tasks.inverse`` (deep equilibrium image reconstruction) and ``deqlab.tasks.inr``
(implicit neural representations).

They live in the repository's top-level ``tasks/`` folder; an installed wheel carries them
here, under ``deqlab``, so no generic top-level ``tasks`` package is installed. From a clone,
this package's path reaches into ``tasks/``.
"""

from pathlib import Path

_REPOSITORY_TASKS = Path(__file__).resolve().parents[2] / "tasks"
if (_REPOSITORY_TASKS / "cifar" / "__init__.py").is_file():
    __path__.append(str(_REPOSITORY_TASKS))
