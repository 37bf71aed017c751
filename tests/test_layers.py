"""The package imports one way down (scripts/check_layers.py), and the check itself can fail."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "bshadow_jax"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(text))
    return root


def test_the_package_has_no_cycle_and_imports_only_downward():
    assert check_layers.check(ROOT / "bshadow_jax") == []
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_layers.py")], capture_output=True, text=True)
    assert run.returncode == 0 and "no cycle" in run.stdout, run.stdout + run.stderr


def test_an_import_inside_a_function_still_counts(tmp_path):
    root = _package(tmp_path, {
        "models/llama.py": "def f():\n    from bshadow_jax.training import loop\n",
        "training/loop.py": "from bshadow_jax.models import llama\n",
    })
    problems = check_layers.check(root)
    assert any("bshadow_jax.models.llama:2: imports bshadow_jax.training.loop" in p and "higher layer" in p
               for p in problems), problems
    assert any(p.startswith("import cycle:") and "bshadow_jax.models.llama" in p for p in problems), problems


def test_siblings_in_one_layer_and_unplaced_packages_are_refused(tmp_path):
    root = _package(tmp_path, {
        "training/loop.py": "import bshadow_jax.diagnostics.run\n",
        "diagnostics/run.py": "",
        "plugins/extra.py": "from bshadow_jax import errors\n",
        "errors.py": "",
    })
    problems = check_layers.check(root)
    assert any("same layer (diagnostics vs training)" in p for p in problems), problems
    assert any(p.startswith("plugins: not placed in any layer") for p in problems), problems


def test_cycles_within_a_package_and_relative_imports(tmp_path):
    root = _package(tmp_path, {
        "data/config.py": "from . import interventions\n",
        "data/interventions.py": "from .config import X\n",
    })
    assert check_layers.check(root) == ["import cycle: bshadow_jax.data.config -> bshadow_jax.data.interventions"]


def test_type_checking_imports_do_not_run_and_do_not_count(tmp_path):
    root = _package(tmp_path, {
        "models/llama.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bshadow_jax.training import loop\n",
        "training/loop.py": "from bshadow_jax.models import llama\n",
    })
    assert check_layers.check(root) == []


def test_help_imports_no_heavy_library():
    """`bshadow --help` builds every subcommand's parser without importing jax, orbax or transformers:
    each package's cli.py and the package roots stay light."""
    code = ("import sys; from bshadow_jax.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('jax', 'orbax', 'transformers', 'torch', 'grain') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_lazy_package_exports_resolve_to_what_they_name():
    """Each lazily exported name resolves, and is not shadowed by a submodule of the same name (a
    submodule import sets that attribute on the package, which would hide the function)."""
    import importlib
    import types

    for pkg in ("bshadow_jax.models", "bshadow_jax.formats", "bshadow_jax.diagnostics"):
        mod = importlib.import_module(pkg)
        for name in mod.__all__:
            importlib.import_module(mod._EXPORTS[name])  # as if someone imported the defining module first
            value = getattr(mod, name)
            assert not isinstance(value, types.ModuleType), f"{pkg}.{name} is a module"
