"""Packaging: pyproject.toml holds the metadata; this file finds the packages, so that a new
subpackage of deqlab or a new task under tasks/ goes into the wheel without a hand list.

In the wheel, tasks/<name> is deqlab.tasks.<name> and conf/ is deqlab/conf.
"""

from pathlib import Path

from setuptools import find_packages, setup

TASKS = sorted(p.parent.name for p in Path(__file__).parent.glob("tasks/*/__init__.py"))

setup(
    packages=[
        *find_packages(include=["deqlab", "deqlab.*"]),
        *(f"deqlab.tasks.{task}" for task in TASKS),
        "deqlab.conf",
    ],
    package_dir={
        **{f"deqlab.tasks.{task}": f"tasks/{task}" for task in TASKS},
        "deqlab.conf": "conf",
    },
)
