"""``python -m deqlab ...``: the ``deqlab`` command (:mod:`deqlab.runner.cli`)."""

from deqlab.runner.cli import main

if __name__ == "__main__":
    main()
