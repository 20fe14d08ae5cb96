"""
The package's layers (docs/design.md, "The map"): experiments/ -> evaluation/ -> run/ (with the
original train_util.py, the loop a run drives) -> the core (the other originals' modules,
options/, methods/). An import upwards would make the folder listing lie about the architecture.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "improved_diffusion")
LAYERS = ["core", "run", "evaluation", "experiments"]  # each may import only from those before it
SUBPACKAGES = {"options": "core", "methods": "core", "run": "run", "evaluation": "evaluation",
               "experiments": "experiments"}


def layer_of(module):
    """'improved_diffusion.run.training' -> 'run'; the top-level modules are the core."""
    if module == "improved_diffusion.train_util":
        return "run"
    parts = module.split(".")
    return SUBPACKAGES.get(parts[1], "core") if len(parts) > 1 else "core"


def imports_of(path, module):
    """Absolute names of the package modules (or packages) that `path` imports."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "improved_diffusion":
                found += [f"{target}.{a.name}" for a in node.names] if target.count(".") < 2 else [target]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("improved_diffusion.")]
    return found


def package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path, module in package_modules():
        own = LAYERS.index(layer_of(module))
        for target in imports_of(path, module):
            if LAYERS.index(layer_of(target)) > own:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports upwards:\n" + "\n".join(upward)


@pytest.mark.parametrize("module, target, upward", [
    ("improved_diffusion.run.run_dir", "improved_diffusion.evaluation.sampling", True),
    ("improved_diffusion.evaluation.sampling", "improved_diffusion.run.run_dir", False),
    ("improved_diffusion.train_util", "improved_diffusion.run.ema", False),
    ("improved_diffusion.script_util", "improved_diffusion.train_util", True),
    ("improved_diffusion.methods.clts", "improved_diffusion.resample", False),
])
def test_the_layer_rule_itself(module, target, upward):
    assert (LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))) == upward


def test_design_doc_shows_the_training_step_as_it_is():
    """docs/design.md quotes TrainLoop.run_step "as it is": the quote is the source."""
    import inspect

    from improved_diffusion.train_util import TrainLoop

    doc = open(os.path.join(os.path.dirname(PACKAGE), "docs", "design.md")).read()
    quoted = doc.split("`TrainLoop.run_step` (improved_diffusion/train_util.py), as it is:\n\n```python\n", 1)[1]
    assert quoted.split("```", 1)[0].rstrip("\n") == inspect.getsource(TrainLoop.run_step).rstrip("\n")
