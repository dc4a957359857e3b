"""The module structure: every module imports alone, the import graph has no cycle, the pure math imports no
model, training, pipeline or I/O module, inference imports nothing of training, and no private name crosses
a module boundary. The graph is read from the source (``ast``), function-level imports included."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATH = ("diffjax.schedules", "diffjax.losses", "diffjax.samplers", "diffjax.guidance", "diffjax.pixels")
TRAINING = ("diffjax.train", "diffjax.loop")
INFERENCE = ("diffjax.pipeline", "diffjax.sampling", "diffjax.model_folder", "diffjax.diffusers_format",
             "diffjax.build", "diffjax.checkpoints", "diffjax.models.factory")
# The compiled sampling program: the math, the networks and the text encoder, nothing of loading or the pipeline.
SAMPLING = "diffjax.sampling"
# The formats read and write files only: no experiment config (diffjax.build), no pipeline, no checkpoints.
FORMATS = ("diffjax.model_folder", "diffjax.diffusers_format")
# The experiment schema (defaults and validation) reads the networks' config classes and the input pipeline's section;
# what builds, trains or samples reads it, never the other way round.
SCHEMA = "diffjax.config"
# The networks: each builds on the shared layers (diffjax.models.layers), none on another network's file.
NETWORKS = ("diffjax.models.unet", "diffjax.models.dit", "diffjax.models.autoencoder", "diffjax.models.classifier",
            "diffjax.models.inception", "diffjax.models.alignment", "diffjax.models.clip_guide")


def _modules(package="diffjax"):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(path, module):
    """(imported diffjax module, imported names) for every import statement in the file."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            attrs = tuple(n for n in names if f"{base}.{n}" not in MODULES)
            if attrs or node.module is None:
                yield base, attrs
            for n in names:
                if f"{base}.{n}" in MODULES:
                    yield f"{base}.{n}", ()


def _graph():
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for name, _ in _imports(path, module):
            if name in MODULES and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_import_graph_has_no_cycle_and_points_one_way():
    graph = _graph()
    for module in graph:
        # A package's __init__ imports its own submodules; a submodule importing its package is a cycle only
        # through another submodule, which the check below sees.
        deps = _reachable({m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()}, module)
        assert module not in deps, f"import cycle through {module}"
    for module in MATH:
        assert _reachable(graph, module) <= set(MATH), (module, _reachable(graph, module) - set(MATH))
    for module in INFERENCE:
        bad = _reachable(graph, module) & set(TRAINING)
        assert not bad, f"{module} imports training modules {bad}"
    for module in NETWORKS:
        others = _reachable(graph, module) & (set(NETWORKS) - {module})
        assert not others, f"{module} imports the network file(s) {others}: move what they share to models/layers.py"
    allowed = set(MATH) | {"diffjax.text", "diffjax.xla_cpu", "diffjax.runtime", "diffjax"}
    beyond = {m for m in _reachable(graph, SAMPLING) if m not in allowed and not m.startswith("diffjax.models.")}
    assert not beyond, f"{SAMPLING} imports {beyond}: the program takes its inputs, it does not load them"
    for module in FORMATS:
        bad = _reachable(graph, module) & {"diffjax.build", "diffjax.pipeline", "diffjax.checkpoints", *TRAINING}
        assert not bad, f"{module} imports {bad}: a format reads and writes files, the rest is diffjax.build's"
    bad = _reachable(graph, SCHEMA) & {*TRAINING, "diffjax.pipeline", "diffjax.model_folder", "diffjax.evaluation"}
    assert not bad, f"{SCHEMA} imports {bad}"
    users_of_both = [m for m in graph if {"diffjax.train", "diffjax.pipeline"} <= graph[m]]
    assert users_of_both == ["diffjax.loop"], users_of_both


def test_evaluation_sits_on_top_of_the_library():
    """diffjax.evaluation sits on top, beside the command line: no other library module imports it. Its metrics
    and classifier need nothing of diffjax's training or sampling (the classifier trains without diffjax.train),
    and its report nothing of diffjax at all."""
    graph = _graph()
    evaluation = {m for m in graph if m == "diffjax.evaluation" or m.startswith("diffjax.evaluation.")}
    assert {"diffjax.evaluation.metrics", "diffjax.evaluation.classifier", "diffjax.evaluation.text_to_image",
            "diffjax.evaluation.report"} <= evaluation
    importers = sorted(m for m in graph if m not in evaluation and graph[m] & evaluation)
    assert not importers, f"{importers} import diffjax.evaluation"
    for module in ("diffjax.evaluation.metrics", "diffjax.evaluation.classifier"):
        bad = _reachable(graph, module) & (set(TRAINING) | set(INFERENCE) - {"diffjax.checkpoints"})
        assert not bad, f"{module} imports training or sampling modules {bad}"
    assert not _reachable(graph, "diffjax.evaluation.report")


def test_no_private_name_is_imported_across_modules():
    files = dict(MODULES)
    for package in ("experiments", "benchmarks"):
        files.update(_modules(package))
    bad = []
    for module, path in files.items():
        for name, names in _imports(path, module):
            if name.startswith("diffjax"):
                bad += [f"{module} imports {name}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


# Run once in a fresh interpreter: it imports the third-party packages diffjax builds on (the slow part of every
# import, and not what is tested), then forks a child per diffjax module that imports that module first. Each child
# starts with no diffjax module loaded, so an import cycle hidden by import order shows up as it would in a fresh
# interpreter, for a fraction of the CPU time of an interpreter per module.
_FORK_EACH = """
import os, sys, traceback
import numpy, jax, jax.numpy, flax.linen, optax, orbax.checkpoint, ml_collections, transformers
import tensorflow_datasets
assert not [m for m in sys.modules if m == "diffjax" or m.startswith(("diffjax.", "experiments"))]
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            sys.stderr.write(f"--- {module}\\n{traceback.format_exc()[-1500:]}")
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


@pytest.mark.process("each module is imported first in a process of its own")
def test_every_module_imports_alone_in_a_fresh_process():
    """Each module first in a process with no diffjax module loaded (a cycle hidden by import order shows up)."""
    proc = subprocess.run([sys.executable, "-c", _FORK_EACH, *sorted(MODULES)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
