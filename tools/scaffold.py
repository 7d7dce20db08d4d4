"""``effinfer new-plugin``: write a pip-installable plugin package that works on the first run.

::

    effinfer new-plugin head_pruning --node model.compression.sparsification.weight_pruning.structured \\
        --level model --out ~/src

writes ``~/src/effinfer-head-pruning/``: a ``pyproject.toml`` with the ``effinfer`` entry point,
``src/effinfer_head_pruning/__init__.py`` with a :class:`~effinfer.core.Technique` subclass on
that taxonomy node (a pydantic ``Config``, the stage hook of the level, a paper placeholder), a
README and ``tests/`` that pass on :mod:`effinfer.core.testing`'s tiny models. The technique
is a skeleton: it loads, validates its config and runs its stage without changing anything yet
(the data-level one cuts long documents, a stand-in for a compressor).

Every input is checked before a file is written: the name (lowercase snake_case, not taken by
an installed technique; a fix is suggested), the node (a taxonomy id; close ids are suggested)
and the target folder (an existing one is refused unless ``--force``).

The templates are Jinja2 files under ``templates/plugin/``. Jinja2 rather than copier or
cookiecutter: both of those render Jinja2 templates too, but add an interactive questionnaire,
template-update machinery and their own dependency trees (cookiecutter: requests, arrow,
python-slugify, ...; copier: plumbum, questionary, dunamai, ...) that one non-interactive
command with its own validation does not use, while Jinja2 is already in every effinfer
environment (torch depends on it).

This module is an ordinary plugin of the ``effinfer`` entry-point group
(``scaffold = "effinfer.tools.scaffold"``). Its top level imports only the standard library,
Typer and the hook marker, because every ``effinfer`` process loads it; Jinja2, the taxonomy and
the registry are imported when the command runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from effinfer.core.errors import EffinferError, did_you_mean
from effinfer.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from effinfer.core.registry import Registry
    from effinfer.taxonomy import Taxonomy

TEMPLATES = Path(__file__).parent / "templates" / "plugin"
#: a technique name that also makes a clean distribution (``effinfer-a-b``) and package (``effinfer_a_b``)
PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
#: names the generated module imports; a class called like one of them would shadow it
IMPORTED_NAMES = frozenset({"BaseModel", "ConfigDict", "Field", "Paper", "Technique", "Callable",
                            "ModelStage", "SystemStage", "DataStage", "Request", "EffinferError",
                            "UnsupportedModelError"})
#: the stage hook each level's skeleton implements (system: a component, not a decoding strategy)
STAGE_HOOKS = {"model": "effinfer_transform_model", "system": "effinfer_configure_system",
               "data": "effinfer_transform_request"}
#: the skeleton's one config option per level: (field name, a value its range refuses)
EXAMPLE_OPTIONS = {"model": ("skip_layers", "-1"), "system": ("budget", "0"), "data": ("max_document_chars", "0")}


class Level(str, Enum):
    """The taxonomy level whose stage hook the generated technique implements."""

    model = "model"
    system = "system"
    data = "data"


class ScaffoldError(EffinferError, ValueError):
    """``effinfer new-plugin`` was given something it cannot generate; the message says the fix."""


@dataclass(frozen=True)
class PluginSpec:
    """Everything the templates need, derived from the validated inputs."""

    name: str
    node: str
    node_title: str
    level: str
    folder: Path
    effinfer_version: str

    @property
    def distribution(self) -> str:
        return distribution_of(self.name)

    @property
    def package(self) -> str:
        return "effinfer_" + self.name

    @property
    def class_name(self) -> str:
        camel = "".join(part.capitalize() for part in self.name.split("_"))
        return camel + "Technique" if camel in IMPORTED_NAMES else camel

    @property
    def hook(self) -> str:
        return STAGE_HOOKS[self.level]

    @property
    def requirement(self) -> str:
        """``effinfer>=X.Y,<X.Y+1``: the minor series this package is generated against."""
        major, minor = (int(part) for part in re.findall(r"\d+", self.effinfer_version)[:2])
        return f"effinfer>={major}.{minor},<{major}.{minor + 1}" if major == 0 else f"effinfer>={major}.{minor},<{major + 1}"

    def context(self) -> dict[str, object]:
        option, bad_value = EXAMPLE_OPTIONS[self.level]
        return {
            "name": self.name, "node": self.node, "node_title": self.node_title, "level": self.level,
            "distribution": self.distribution, "package": self.package, "class_name": self.class_name,
            "hook": self.hook, "requirement": self.requirement, "effinfer_version": self.effinfer_version,
            "option": option, "bad_value": bad_value,
        }

    def files(self) -> dict[str, str]:
        """Template file → path in the generated package."""
        return {
            "pyproject.toml.jinja": "pyproject.toml",
            "README.md.jinja": "README.md",
            "gitignore.jinja": ".gitignore",
            "technique.py.jinja": f"src/{self.package}/__init__.py",
            "test_technique.py.jinja": f"tests/test_{self.name}.py",
        }


# ─────────────────────────────────────────────────────────────── validation ──


def suggest_name(name: str) -> str:
    """A valid plugin name close to ``name`` (``"MyPruner"``, ``"effinfer-my-pruner"`` → ``"my_pruner"``)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip()).lower()
    snake = re.sub(r"[^a-z0-9]+", "_", snake).strip("_")
    snake = re.sub(r"_+", "_", snake)
    while snake != (stripped := re.sub(r"^effinfer_?", "", snake).lstrip("0123456789_")):
        snake = stripped
    return snake if PLUGIN_NAME.match(snake) else ""


def distribution_of(name: str) -> str:
    """The distribution a plugin called ``name`` gets: ``head_pruning`` → ``effinfer-head-pruning``."""
    return "effinfer-" + name.replace("_", "-")


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def check_name(name: str, registry: Registry | None = None) -> None:
    """Refuse a name that is not lowercase snake_case, starts with ``effinfer`` or is taken."""
    problem = None
    if not PLUGIN_NAME.match(name):
        problem = ("must be lowercase snake_case: letters, digits and single underscores, starting with a "
                   "letter (it is the technique name users type, and gives the package effinfer_<name>)")
    elif name == "effinfer" or name.startswith("effinfer_"):
        problem = "must not start with 'effinfer': the distribution and package get that prefix already"
    if problem:
        fix = suggest_name(name)
        raise ScaffoldError(f"plugin name {name!r} {problem}" + (f"; try {fix!r}" if fix and fix != name else ""))
    owner = registry.techniques[name].distribution if registry is not None and name in registry.techniques else None
    if owner is not None and _normalized(owner) != _normalized(distribution_of(name)):  # regenerating is fine
        raise ScaffoldError(f"technique name {name!r} is already registered by the installed distribution {owner!r} "
                            "(an installed technique keeps its name); choose another name")


def check_node(node: str, taxonomy: Taxonomy) -> None:
    """Refuse a node id that is not in the taxonomy, naming the closest ids."""
    if node in taxonomy:
        return
    closest = taxonomy.closest(node)  # by full id, last segment and aliases
    hint = f"; did you mean: {', '.join(closest)}?" if closest else did_you_mean(node, taxonomy.nodes)
    raise ScaffoldError(f"unknown taxonomy node {node!r}{hint} (run `effinfer taxonomy` to list them)")


def check_folder(folder: Path, force: bool) -> None:
    """Refuse to write into an existing path unless ``force``; refuse a file in any case."""
    if folder.exists() and not folder.is_dir():
        raise ScaffoldError(f"{folder} exists and is not a folder; choose another --out")
    if folder.exists() and not force:
        raise ScaffoldError(f"{folder} already exists; pass --force to overwrite the generated files in it "
                            "(other files are left alone), or choose another --out")


def plan(name: str, node: str, level: Level | str | None, out: Path, force: bool = False,
         registry: Registry | None = None, taxonomy: Taxonomy | None = None) -> PluginSpec:
    """Validate every input (nothing is written) and return what to generate."""
    from importlib.metadata import version

    from effinfer.taxonomy import load_taxonomy

    taxonomy = taxonomy or load_taxonomy()
    check_name(name, registry)
    check_node(node, taxonomy)
    chosen = Level(level).value if level is not None else taxonomy.get(node).level
    spec = PluginSpec(name=name, node=node, node_title=taxonomy.get(node).title, level=chosen,
                      folder=Path(out) / distribution_of(name), effinfer_version=version("effinfer"))
    check_folder(spec.folder, force)
    return spec


# ─────────────────────────────────────────────────────────────── rendering ──


def render(spec: PluginSpec) -> dict[str, str]:
    """Path in the package → file content (Jinja2; an undefined variable is an error, not blank)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
                      trim_blocks=True, lstrip_blocks=True, autoescape=False)
    context = spec.context()
    return {target: env.get_template(template).render(context) for template, target in spec.files().items()}


def write(spec: PluginSpec, files: dict[str, str]) -> list[Path]:
    """Write the rendered files under ``spec.folder``; return their paths."""
    written = []
    for relative, content in files.items():
        path = spec.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def new_plugin(name: str, node: str, level: Level | str | None = None, out: Path = Path("."), force: bool = False,
               registry: Registry | None = None) -> tuple[PluginSpec, list[Path]]:
    """Validate, render, then write the package; returns the spec and the files written."""
    spec = plan(name, node, level, out, force, registry)
    return spec, write(spec, render(spec))


# ─────────────────────────────────────────────────────────────── the command ──


def new_plugin_command(
    name: Annotated[str, typer.Argument(help="technique name, lowercase snake_case (e.g. head_pruning)")],
    node: Annotated[str, typer.Option("--node", help="taxonomy node id (see `effinfer taxonomy`)")],
    level: Annotated[Level | None, typer.Option(
        "--level", help="which stage hook to implement (model: transform the model; system: configure "
                        "generation components; data: rewrite requests); default: the node's level")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder to create the package in")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="overwrite the generated files of an existing package folder")
                     ] = False,
) -> None:
    """Write a pip-installable plugin package: a technique on NODE, its entry point, README and tests."""
    from rich.console import Console
    from rich.markup import escape

    from effinfer.core.registry import get_registry

    try:
        spec, written = new_plugin(name, node, level, out, force, get_registry())
    except ScaffoldError as error:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        raise typer.Exit(2) from None
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"wrote {spec.distribution} ({spec.level}-level technique [bold]{spec.name}[/] on {spec.node}):")
    for path in written:
        console.print(f"  {path}", markup=False)
    if spec.level != spec.node.split(".")[0]:
        console.print(f"note: {spec.node} is a {spec.node.split('.')[0]}-level node; the technique acts at "
                      f"the {spec.level} level (its stage hook is {spec.hook})", markup=False)
    folder = spec.folder if spec.folder.is_absolute() else f"./{spec.folder}"  # pip reads "name[test]" as a name
    console.print("next steps:\n"
                  f"  pip install -e '{folder}[test]'\n"
                  f"  pytest {spec.folder / 'tests'}\n"
                  f"  effinfer plugins show {spec.name}\n"
                  f"then fill in the TODOs of {spec.folder / 'src' / spec.package / '__init__.py'} "
                  "(the method, the paper, the summary)", markup=False)


@hookimpl
def effinfer_register_commands(app: typer.Typer) -> None:
    """Add ``effinfer new-plugin`` to the CLI."""
    app.command("new-plugin")(new_plugin_command)


__all__ = ["Level", "PluginSpec", "ScaffoldError", "check_folder", "check_name", "check_node",
           "effinfer_register_commands", "new_plugin", "plan", "render", "suggest_name", "write"]
