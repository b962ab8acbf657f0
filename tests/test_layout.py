"""The package's layering and size rules, checked on the source (no import needed)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tfreward"
MAX_LINES = 350


def _modules():
  return sorted(PACKAGE.rglob("*.py"))


def _imports(path):
  """Every module name `path` imports (absolute names, `from a.b import c` gives a.b and a.b.c)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _relative(path):
  return path.relative_to(PACKAGE.parent).as_posix()


@pytest.mark.parametrize("path", _modules(), ids=_relative)
def test_module_size(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f"{_relative(path)} has {lines} lines; split it (limit {MAX_LINES})."


def _importing(prefix, banned):
  return {_relative(p): sorted(n for n in _imports(p) if n.startswith(banned))
          for p in _modules() if _relative(p).startswith(prefix)}


def test_models_never_import_training_or_export():
  offenders = {k: v for k, v in _importing("tfreward/models/", ("tfreward.training", "tfreward.export")).items() if v}
  assert not offenders, offenders


def test_training_never_imports_export():
  offenders = {k: v for k, v in _importing("tfreward/training/", ("tfreward.export",)).items() if v}
  assert not offenders, offenders


def test_algorithms_never_import_models_training_or_export():
  banned = ("tfreward.models", "tfreward.training", "tfreward.export")
  for prefix in ("tfreward/ops/", "tfreward/losses/", "tfreward/rewards/"):
    offenders = {k: v for k, v in _importing(prefix, banned).items() if v}
    assert not offenders, offenders
