"""The package's layers import only downward, and no modules import each other in a cycle.

Every import in every module counts, function-level ones included, relative or
absolute; an old module path (``cannon_fast._compat.MOVED``) counts as the module it
moved to. The rules are the README's "Development" section.
"""
import ast
from pathlib import Path

import pytest

import cannon_fast
from cannon_fast import _compat

PACKAGE_DIR = Path(cannon_fast.__file__).resolve().parent

#: The layer of each top-level name of the package ("" for the package itself).
#: The C extension holds kernels of the core (it sits at the top only for setup.py).
LAYER_OF_TOP = {"": "root", "_util": "_util", "_compat": "_compat", "_ccannon": "core",
                "store": "store", "testing": "testing", "survey": "survey", "core": "core",
                "apogee": "apogee", "demo": "demo", "lab": "lab", "nn": "nn", "cli": "cli",
                "instruments": "instruments"}

#: What each layer may import besides itself. Everyone may import the package itself
#: (``__version__``): it is lazy and imports nothing but ``_compat``.
ALLOWED = {
    "root": {"_compat"},
    "_compat": set(),
    "_util": set(),
    "store": {"_util"},
    "testing": {"core", "_util"},
    "core": {"_util"},
    "apogee": {"core", "_util", "store"},
    "instruments": {"core", "_util"},
    "demo": {"core", "apogee", "_util"},
    "lab": {"core", "apogee", "demo", "instruments", "nn", "store", "_util", "testing"},
    "survey": {"core", "apogee", "store", "_util"},
    "nn": {"core", "_util"},
    "cli": set(LAYER_OF_TOP.values()),
}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_modules():
    """Module name -> (source path, is a package) for every module of cannon_fast."""
    return {name: (path, is_pkg) for path in sorted(PACKAGE_DIR.rglob("*.py"))
            for name, is_pkg in [_module_name(path)]}


def layer(module):
    """The layer of a cannon_fast module (``cannon_fast.core.fitting`` -> ``"core"``)."""
    top = module.split(".")[1] if "." in module else ""
    return LAYER_OF_TOP[top]


def _resolve(module, is_package, node):
    """The modules an import statement of ``module`` names (old paths mapped to new)."""
    known = set(package_modules()) | {"cannon_fast._ccannon"}

    def new(name):
        return _compat.new_name(name) or name

    if isinstance(node, ast.Import):
        return [new(a.name) for a in node.names if a.name.split(".")[0] == "cannon_fast"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "cannon_fast":
        return []
    out = []
    for alias in node.names:
        sub = new(f"{base}.{alias.name}")
        if sub in known:  # from package import submodule
            out.append(sub)
        elif new(base) == "cannon_fast" and alias.name in cannon_fast._LAZY:
            out.append(cannon_fast._LAZY[alias.name])  # from cannon_fast import CannonModel
        else:
            out.append(new(base))
    return out


def imports_of(module, source, is_package=False):
    """Every cannon_fast module that ``source`` (the text of ``module``) imports."""
    tree = ast.parse(source)
    return sorted({t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in _resolve(module, is_package, node)})


def layer_violations(module, targets):
    """The imports of ``module`` that its layer may not make."""
    own = layer(module)
    return [(module, t) for t in targets
            if layer(t) not in ALLOWED[own] | {own, "root"}]


def import_graph():
    """Module -> the modules it imports, for the whole package."""
    return {name: imports_of(name, path.read_text(encoding="utf-8"), is_pkg)
            for name, (path, is_pkg) in package_modules().items()}


def find_cycles(graph):
    """Strongly connected groups of modules (more than one) in an import graph.

    Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so an import counts for those
    packages too, except for the importer's own packages: they have run before it, so a
    package ``__init__`` that re-exports its submodules is no cycle with them. An
    explicit import of one's own package (``from .. import x``) does count.
    """
    edges = {}
    for mod, targets in graph.items():
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        deps = set(targets)
        for t in targets:
            parts = t.split(".")
            deps.update({".".join(parts[:i]) for i in range(1, len(parts))} - own)
        edges[mod] = {d for d in deps if d != mod and d in graph}
    # Tarjan's strongly connected components, iteratively
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        group.append(m)
                        if m == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for mod in sorted(edges):
        if mod not in index:
            visit(mod)
    return groups


# ----------------------------------------------------------------------------- the package
def test_every_module_has_a_layer():
    for mod in package_modules():
        assert layer(mod) in ALLOWED, mod


def test_layers_import_only_what_they_may():
    bad = [v for mod, targets in import_graph().items() for v in layer_violations(mod, targets)]
    assert bad == [], "\n".join(f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, t in bad)


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_old_paths_are_read_as_the_new_modules():
    graph = import_graph()
    everything = {t for targets in graph.values() for t in targets}
    assert not {t for t in everything if _compat.new_name(t) is not None}
    assert "cannon_fast.core._common" in graph["cannon_fast.core.fitting"]


# ----------------------------------------------------------------------------- the checker
@pytest.mark.parametrize("line", [
    "from ..io import apogee",
    "from ..apogee import files",
    "from ..io.apogee import NPIX",
    "from cannon_fast.io.apogee import CDELT1",
    "import cannon_fast.apogee.files",
    "def f():\n    from ..apogee.files import CHIP_RANGES\n    return CHIP_RANGES",
])
def test_checker_reports_core_importing_apogee(line):
    source = "import numpy as np\n\nfrom . import vectorizer as vz\n" + line + "\n"
    targets = imports_of("cannon_fast.core.fitting", source)
    assert "cannon_fast.apogee.files" in targets
    assert layer_violations("cannon_fast.core.fitting", targets) == [
        ("cannon_fast.core.fitting", "cannon_fast.apogee.files")]


def test_checker_reads_package_relative_imports_and_lazy_names():
    assert imports_of("cannon_fast.demo", "from .datasets import LABEL_NAMES",
                      is_package=True) == ["cannon_fast.demo.datasets"]
    assert imports_of("cannon_fast.nn._common", "from .. import __version__") == ["cannon_fast"]
    assert imports_of("cannon_fast.nn.x", "from cannon_fast import CannonModel") == [
        "cannon_fast.core.model"]
    assert layer_violations("cannon_fast.nn.x", ["cannon_fast.lab.pipeline"]) == [
        ("cannon_fast.nn.x", "cannon_fast.lab.pipeline")]
    assert layer_violations("cannon_fast.cli.x", ["cannon_fast.lab.pipeline"]) == []


def test_checker_finds_cycles_but_not_re_exports():
    graph = {"cannon_fast.lab.pipeline": ["cannon_fast.lab.report"],
             "cannon_fast.lab.report": ["cannon_fast.lab.pipeline"],
             "cannon_fast.demo": ["cannon_fast.demo.datasets"],
             "cannon_fast.demo.datasets": ["cannon_fast.apogee.lines"],
             "cannon_fast.apogee.lines": []}
    assert find_cycles(graph) == [["cannon_fast.lab.pipeline", "cannon_fast.lab.report"]]
    # a module importing a package whose __init__ imports it back (through datasets) is one
    graph["cannon_fast.apogee.lines"] = ["cannon_fast.demo"]
    assert sorted(find_cycles(graph)) == [
        ["cannon_fast.apogee.lines", "cannon_fast.demo", "cannon_fast.demo.datasets"],
        ["cannon_fast.lab.pipeline", "cannon_fast.lab.report"]]
