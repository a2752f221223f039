"""The house rules: every module of ``koa_ray`` imports only from rooms below its own, and the README names the tree.

Rooms, bottom to top (the data flow: image files -> prepare -> train -> checkpoint -> evaluate / score / gradcam):

    base        package constants (koa_ray/__init__), config, console (progress), Ray start-up (runtime), plots, tracking
    data        image files in: ingest, decode, ROI, synthetic films, prepare, balance, augment, test-time views
    models | losses | metrics   tensors in, logits / loss / numbers out; side by side, none imports another
    checkpoint  the format the trainer writes and inference reads (below both, so neither reaches into the other)
    train       the Ray Train worker loop, driver and local mode
    tune        sweeps of training runs
    infer       a checkpoint applied to images: predictor, score, evaluate + report, Grad-CAM, export
    demo        the end-to-end demo (synthesise, prepare, train, evaluate)
    cli         argument parsing only

Every import counts, including the lazy ones inside functions. A module may import from its own room and from any
room lower in the list, never from a room above it or beside it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "koa_ray"

# (room, rank, module prefixes). Rooms of equal rank sit side by side and may not import each other.
ROOMS: list[tuple[str, int, tuple[str, ...]]] = [
    ("base", 0, ("koa_ray", "koa_ray.config", "koa_ray.progress", "koa_ray.runtime", "koa_ray.plots",
                 "koa_ray.tracking")),
    ("data", 1, ("koa_ray.data",)),
    ("models", 2, ("koa_ray.models",)),
    ("losses", 2, ("koa_ray.losses",)),
    ("metrics", 2, ("koa_ray.metrics",)),
    ("checkpoint", 3, ("koa_ray.checkpoint",)),
    ("train", 4, ("koa_ray.train",)),
    ("tune", 5, ("koa_ray.tune",)),
    ("infer", 6, ("koa_ray.infer",)),
    ("demo", 7, ("koa_ray.demo",)),
    ("cli", 8, ("koa_ray.cli",)),
]


def room_of(module: str) -> tuple[str, int]:
    """The room of a dotted module name: the one whose prefix matches most specifically.

    Raises:
        LookupError: the module is in no room (a new top-level module must be given one here).
    """
    best = None
    for room, rank, prefixes in ROOMS:
        for prefix in prefixes:
            exact_root = prefix == "koa_ray" and module == "koa_ray"
            if exact_root or (prefix != "koa_ray" and (module == prefix or module.startswith(prefix + "."))):
                if best is None or len(prefix) > best[2]:
                    best = (room, rank, len(prefix))
    if best is None:
        raise LookupError(f"{module}: in no room of tests/test_layers.py ROOMS; place it in the layering")
    return best[0], best[1]


def module_name(path: Path, package_dir: Path = PACKAGE) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every ``koa_ray`` import in ``source``, relative ones resolved; for
    ``from koa_ray import X`` the name is ``koa_ray.X`` when X is a sub-module, else ``koa_ray`` (a constant)."""
    out = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "koa_ray"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "koa_ray":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer_violations(files: list[Path], package_dir: Path = PACKAGE) -> list[str]:
    """Every import of a module from a room that is not below its own (or its own), as readable lines."""
    bad = []
    for path in files:
        module = module_name(path, package_dir)
        room, rank = room_of(module)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            t_room, t_rank = room_of(target)
            if t_room != room and t_rank >= rank:
                where = "above" if t_rank > rank else "beside"
                bad.append(f"{path.relative_to(package_dir.parent)}:{line}: {module} ({room}) imports {target} "
                           f"({t_room}, {where} it)")
    return bad


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_room():
    for path in package_files():
        room_of(module_name(path))  # raises, naming the module, if it has no room


def test_no_module_imports_from_a_room_above_or_beside_it():
    assert layer_violations(package_files()) == []


def test_the_check_catches_an_upward_a_sideways_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "koa_ray"
    (pkg / "data").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text("GRADES = (0, 1, 2, 3, 4)\n")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "losses.py").write_text("from koa_ray.metrics import quadratic_weighted_kappa\n")  # beside
    (pkg / "metrics.py").write_text("from koa_ray import GRADES\n")  # a constant of the base: fine
    (pkg / "data" / "prep.py").write_text("def f():\n    from koa_ray.train.loop import train_loop\n")  # lazy, up
    (pkg / "models" / "blocks.py").write_text("from .densenet import build_model\nfrom ..checkpoint import unwrap\n")
    found = layer_violations(sorted(pkg.rglob("*.py")), pkg)
    assert found == [
        "koa_ray/data/prep.py:2: koa_ray.data.prep (data) imports koa_ray.train.loop (train, above it)",
        "koa_ray/losses.py:1: koa_ray.losses (losses) imports koa_ray.metrics (metrics, beside it)",
        "koa_ray/models/blocks.py:2: koa_ray.models.blocks (models) imports koa_ray.checkpoint (checkpoint, above it)",
    ]
    with pytest.raises(LookupError, match="koa_ray.serve"):
        room_of("koa_ray.serve")


def test_configuration_loads_without_the_models_or_torch():
    """Checking a config (as every command does before starting Ray) imports neither torch nor the model code."""
    code = ("import sys\nfrom koa_ray.config import load_train_config\n"
            "load_train_config(overrides={'model.arch': 'densenet_tiny', 'model.attention': 'se'})\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'koa_ray.models', 'koa_ray.metrics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _readme_layout_paths() -> list[str]:
    """The first word of every line of the README's code-layout block that starts with ``koa_ray/``."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Code layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README.md has no '## Code layout' section"
    return [line.split()[0] for line in m.group(1).splitlines() if line.startswith("koa_ray/")]


def test_the_readme_layout_names_every_module_and_only_existing_ones():
    named = _readme_layout_paths()
    assert len(named) == len(set(named)), "README code layout names a path twice"
    on_disk = {p.relative_to(ROOT).as_posix() for p in package_files() if p.name != "__init__.py"}
    on_disk |= {p.parent.relative_to(ROOT).as_posix() + "/" for p in PACKAGE.rglob("__init__.py")
                if p.parent != PACKAGE}
    on_disk.add("koa_ray/__init__.py")
    assert sorted(on_disk - set(named)) == [], "README code layout does not name these"
    assert sorted(set(named) - on_disk) == [], "README code layout names paths that are not in the tree"
