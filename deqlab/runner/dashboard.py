"""``deqlab dashboard --project P --entity E``: the deqlab workspace in a W&B project.

Built with W&B's own workspace library (``pip install 'deqlab[wandb]'``, i.e.
``wandb-workspaces``) and saved as a view of the project (needs the network and a login):

- *Which variant trains best*: the monitored metric against step and against wall-clock time,
  grouped by solver and by gradient mode;
- *Solver cost*: forward and backward f evaluations and relative residuals;
- *Residual traces*: the ``deq/residual_trace`` figures of the validations;
- *Optimization*: training loss and learning rate.

:func:`build_workspace` makes the object without the network (tests check its panels).
"""

from __future__ import annotations

import argparse
from typing import Any


def build_workspace(project: str, entity: str, monitor: str = "val/acc") -> Any:
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def by(key: str, x: str = "Step", title: str = "") -> wr.LinePlot:
        return wr.LinePlot(
            title=title or f"{monitor} by {key}",
            x=x,
            y=[monitor],
            groupby=wr.Config(f"{key}.name"),
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
        )

    def plot(*metrics: str, log_y: bool = False) -> wr.LinePlot:
        return wr.LinePlot(title=", ".join(metrics), x="Step", y=list(metrics), log_y=log_y)

    sections = [
        ws.Section(
            name="Which variant trains best",
            is_open=True,
            panels=[
                by("solver"),
                by("grad"),
                by("solver", "RelativeTime(Wall)", f"{monitor} against time, by solver"),
                by("grad", "RelativeTime(Wall)", f"{monitor} against time, by grad"),
            ],
        ),
        ws.Section(
            name="Solver cost",
            is_open=True,
            panels=[
                plot("deq/fwd_nfe"),
                plot("deq/bwd_nfe"),
                plot("deq/fwd_rel_residual", "deq/val_fwd_rel_residual", log_y=True),
                plot("deq/bwd_rel_residual", log_y=True),
            ],
        ),
        ws.Section(
            name="Residual traces",
            panels=[wr.MediaBrowser(title="deq/residual_trace", media_keys=["deq/residual_trace"])],
        ),
        ws.Section(name="Optimization", panels=[plot("train/loss"), plot("train/lr")]),
    ]
    return ws.Workspace(entity=entity, project=project, name="deqlab", sections=sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deqlab dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--monitor", default="val/acc", help="val/acc (CIFAR), val/ppl (LM)")
    args = parser.parse_args(argv)
    workspace = build_workspace(args.project, args.entity, args.monitor).save()
    print(f"deqlab dashboard: {workspace.url}")


if __name__ == "__main__":
    main()
