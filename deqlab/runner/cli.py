"""The ``deqlab`` command.

deqlab [overrides]                 train / test, as ``python -m deqlab [overrides]``
deqlab report FOLDER               compare the runs of a sweep (deqlab.runner.report)
deqlab dashboard --project P ...   the deqlab workspace in a W&B project (deqlab.runner.dashboard)
"""

from __future__ import annotations

import sys


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "report":
        from deqlab.runner.report import main as report

        report(sys.argv[2:])
    elif command == "dashboard":
        from deqlab.runner.dashboard import main as dashboard

        dashboard(sys.argv[2:])
    else:
        from deqlab.runner.main import main as train

        train()


if __name__ == "__main__":
    main()
