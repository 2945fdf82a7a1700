"""The structure rules of DESIGN.md that a reader relies on, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "stable_diffusion").rglob("*.py"), *(ROOT / "webui").rglob("*.py"), ROOT / "app.py"])
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 80, 300
# Reference implementations are for the tests only: the package and the app never import them.
TEST_ONLY = ("diffusers", "peft", "open_clip")  # and transformers beyond its tokenizer: below


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_function_fits_on_a_screen_and_every_class_has_one_job(path: Path) -> None:
    too_long = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines = node.end_lineno - node.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > limit:
                too_long.append(f"{node.name} (line {node.lineno}): {lines} lines, limit {limit}")
    assert not too_long, too_long


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_reference_implementations_stay_in_the_tests(path: Path) -> None:
    imported = _imported_modules(_tree(path))
    offending = [name for name in imported for banned in TEST_ONLY if name == banned or name.startswith(banned + ".")]
    # transformers may be used for its CLIP tokenizer only.
    offending += [name for name in imported
                  if name.startswith("transformers.") and name not in ("transformers.CLIPTokenizer",)]
    assert not offending, offending


def test_the_checks_see_the_sources() -> None:
    """The two checks above would pass on an empty list: make sure they read the real files."""
    assert ROOT / "app.py" in SOURCES and ROOT / "stable_diffusion" / "unet.py" in SOURCES
    assert len(SOURCES) > 20
    assert "torch" in _imported_modules(_tree(ROOT / "stable_diffusion" / "unet.py"))
