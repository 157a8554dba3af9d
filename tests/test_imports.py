"""Every module of negpref imports in the test environment: a runtime dependency missing from
pyproject.toml fails here, naming the module, instead of deep inside a run."""

import importlib
import pkgutil

import pytest

import negpref

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(negpref.__path__, "negpref.")
    if m.name != "negpref.__main__"
)


def test_the_package_has_its_modules():
    # A broken walk (e.g. a missing __init__.py) would make the parametrized test vacuous.
    assert {"negpref.losses", "negpref.cli", "negpref.unlearn.runner", "negpref.eval.tofu"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_installed_versions_satisfy_pyproject_and_the_lock():
    """What runs the tests is what pyproject.toml allows and constraints.txt pins."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            lock[name.lower().replace("_", "-")] = pinned
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name}: required by pyproject.toml but not installed (make install)")
        public = installed.split("+")[0]  # torch's local build label (+cpu, +cu128)
        assert req.specifier.contains(public, prereleases=True), (req.name, installed)
        assert lock.get(req.name.lower().replace("_", "-")) == public, (
            f"{req.name} {installed} is not the version constraints.txt pins "
            f"({lock.get(req.name.lower())}); run make install (or make lock)"
        )
