"""The runner: Lightning, Hydra and W&B around the engine (:mod:`deqlab`).

The engine never imports it; it imports the engine, and never a task. One job per module:

- :mod:`~deqlab.runner.module`: ``DEQLitModule``, the training logic every task shares;
  :mod:`~deqlab.runner.fit` (``fit`` and ``jac_reg`` settings) and :mod:`~deqlab.runner.optim`
  (optimizer, schedule, weight-decay groups);
- :mod:`~deqlab.runner.config`: the config groups' schemas, validation and resolvers;
- :mod:`~deqlab.runner.main`: the entry point (validate, build, fit and test, close loggers);
  :mod:`~deqlab.runner.cli`: the ``deqlab`` command and its subcommands;
- :mod:`~deqlab.runner.data`: resumable data order and loaders; :mod:`~deqlab.runner.files`:
  atomic writes and caches; :mod:`~deqlab.runner.checkpoint`: checkpoints and ``init_from``;
  :mod:`~deqlab.runner.cluster`: the run folder's lock, preemption and SLURM requeue;
  :mod:`~deqlab.runner.run_folder`: one run per folder, records written after the checks;
  :mod:`~deqlab.runner.trust`: the classes a saved config may build;
  :mod:`~deqlab.runner.memory`: freed memory handed back to the kernel in long runs;
- :mod:`~deqlab.runner.loggers`, :mod:`~deqlab.runner.sweep` (writes the
  :mod:`~deqlab.runner.manifest`), :mod:`~deqlab.runner.report`, :mod:`~deqlab.runner.dashboard`:
  what a run and a sweep leave behind.
"""
