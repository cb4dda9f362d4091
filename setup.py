"""Packaging: pyproject.toml holds the metadata; this file finds the packages, so that a new
subpackage of deqlab or a new task under tasks/ goes into the wheel without a hand list.

In the wheel, tasks/<name> is deqlab.tasks.<name> and conf/ is deqlab/conf.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
TASKS = sorted(p.parent.name for p in HERE.glob("tasks/*/__init__.py"))
# conf/ and each of its folders is a package of YAML files (setuptools would otherwise warn
# that the folders are importable but unlisted)
CONF = sorted(
    ".".join(("deqlab", *d.relative_to(HERE).parts))
    for d in [HERE / "conf", *(HERE / "conf").rglob("*")]
    if d.is_dir() and any(d.glob("*.yaml"))
)

setup(
    packages=[
        *find_packages(include=["deqlab", "deqlab.*"]),
        *(f"deqlab.tasks.{task}" for task in TASKS),
        *CONF,
    ],
    package_dir={
        **{f"deqlab.tasks.{task}": f"tasks/{task}" for task in TASKS},
        **{pkg: pkg.split(".", 1)[1].replace(".", "/") for pkg in CONF},
    },
    package_data={pkg: ["*.yaml"] for pkg in CONF},
)
