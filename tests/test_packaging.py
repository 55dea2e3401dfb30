"""environment.yml and pyproject.toml list the same requirements; the README's commands are the real ones."""

from __future__ import annotations

import tomllib
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) == wanted


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make train" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_constraints_pin_every_requirement_inside_its_range():
    """make installs with -c constraints.txt: each direct requirement must be pinned there, to a version pyproject
    allows (a pin outside the range would make pip fail; a missing pin would float with the registry)."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = pinned
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (run make lock)"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"


def test_make_installs_the_pinned_versions():
    makefile = (REPO / "Makefile").read_text()
    assert makefile.count("-c constraints.txt") == 2  # torch first, then lmlab[dev]
