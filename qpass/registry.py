"""Pass and recipe names: the registry behind ``--passes``, ``--recipe``, ``qpass passes``.

Passes are found by importing the modules of ``qpass.passes`` and collecting the
:class:`~qpass.pass_base.Pass` subclasses with a ``name``. A pass is written in a pipeline
string as ``name`` or ``name(option=value,...)``; values are parsed as YAML scalars
(``0.5``, ``true``, ``int8``, ``[a, b]``). Recipes are YAML files in ``qpass/recipes``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from importlib import resources
from typing import Any

import yaml

from qpass.errors import UnknownNameError
from qpass.pass_base import Pass

__all__ = ["available_passes", "make_pass", "parse_pipeline", "available_recipes", "load_recipe", "Recipe"]


@functools.cache
def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass class by name, sorted."""
    import qpass.passes as package

    found: dict[str, type[Pass]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Pass) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


def make_pass(name: str, **options: Any) -> Pass:
    """An instance of the pass called ``name`` with ``options``; clear errors for typos."""
    passes = available_passes()
    if name not in passes:
        raise UnknownNameError(f"unknown pass '{name}': run 'qpass passes' to list them")
    cls = passes[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise UnknownNameError(f"pass '{name}' has no option '{unknown[0]}' (options: {known})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise UnknownNameError(f"bad options for pass '{name}': {e}") from e


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_pass_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``'smooth-quant(alpha=0.5)'`` -> ``('smooth-quant', {'alpha': 0.5})``."""
    spec = spec.strip()
    if "(" not in spec:
        return spec, {}
    if not spec.endswith(")"):
        raise UnknownNameError(f"cannot parse pass '{spec}': write name(option=value,...)")
    name, body = spec[: spec.index("(")].strip(), spec[spec.index("(") + 1 : -1]
    options = {}
    for item in _split_top(body):
        if "=" not in item:
            raise UnknownNameError(f"cannot parse option '{item}' of pass '{name}': write option=value")
        key, raw = item.split("=", 1)
        options[key.strip().replace("-", "_")] = yaml.safe_load(raw.strip())
    return name, options


def parse_pipeline(text: str) -> list[Pass]:
    """``'fold-constants,fold-batchnorm(x=1)'`` -> pass instances."""
    return [make_pass(name, **opts) for name, opts in map(parse_pass_spec, _split_top(text))]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pipeline: pass specs (name + options) and the settings it implies."""

    name: str
    description: str
    passes: tuple[tuple[str, dict[str, Any]], ...]
    quantizes: bool = False

    def build(self) -> list[Pass]:
        return [make_pass(name, **dict(opts)) for name, opts in self.passes]


@functools.cache
def available_recipes() -> dict[str, Recipe]:
    recipes = {}
    for entry in sorted(resources.files("qpass.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            recipe = _recipe_from_data(yaml.safe_load(entry.read_text()), entry.name)
            recipes[recipe.name] = recipe
    return recipes


def _recipe_from_data(data: dict, source: str) -> Recipe:
    passes = []
    for item in data.get("passes", []):
        if isinstance(item, str):
            passes.append(parse_pass_spec(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            passes.append((name, dict(opts or {})))
        else:
            raise UnknownNameError(f"recipe {source}: each pass is a name or {{name: {{option: value}}}}")
    return Recipe(data["name"], data.get("description", ""), tuple(passes), bool(data.get("quantizes", False)))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML recipe file."""
    recipes = available_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        try:
            with open(name_or_path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise UnknownNameError(f"cannot read recipe file '{name_or_path}': {e.strerror}") from e
        except yaml.YAMLError as e:
            raise UnknownNameError(f"recipe file '{name_or_path}' is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict) or "name" not in data:
            raise UnknownNameError(f"recipe file '{name_or_path}' needs a 'name' and a 'passes' list")
        return _recipe_from_data(data, name_or_path)
    raise UnknownNameError(f"unknown recipe '{name_or_path}': run 'qpass recipes' to list them")
