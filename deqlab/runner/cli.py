"""The ``deqlab`` command.

deqlab [overrides]                 train / test, as ``python -m deqlab [overrides]``
deqlab report FOLDER               compare the runs of a sweep (deqlab.runner.report)
deqlab dashboard --project P ...   the deqlab workspace in a W&B project (deqlab.runner.dashboard)
deqlab generate CKPT --prompt ...  sample text from a trained DEQ language model
deqlab analyze CKPT [--limit N]    the equilibrium of a trained model, sample by sample
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> the module whose main(argv) runs it, imported by name: the language-model task
# owns `generate`, and the runner imports no task
SUBCOMMANDS = {
    "report": "deqlab.runner.report",
    "dashboard": "deqlab.runner.dashboard",
    "generate": "deqlab.tasks.lm.generate",
    "analyze": "deqlab.runner.analyze",
}


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in SUBCOMMANDS:
        from deqlab.runner.refusal import refusal_in, refuse

        try:
            importlib.import_module(SUBCOMMANDS[command]).main(sys.argv[2:])
        except Exception as e:
            refusal = refusal_in(e)
            if refusal is None:
                raise
            refuse(refusal)  # the message, not a traceback
    else:
        from deqlab.runner.main import main as train

        train()


if __name__ == "__main__":
    main()
