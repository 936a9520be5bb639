"""The package's dependencies run one way: no import cycle, counting imports inside functions and
imports by string (one declared exception: the plugin manager loads the default plugins by name); the
default plugins use only the public plugin API; and a quantize job matches the model against the spec
catalog once."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from typing import Iterable

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_unfuse"


#: The one import by string a cycle may run through: the plugin manager (``plugins.manager``) loads
#: the default plugins by name on first use, and they use the API the rest of the package gives them.
DECLARED_EXCEPTION = ("moe_unfuse.plugins.manager", "moe_unfuse.default_plugins.")


def import_graph(root: Path = PACKAGE, strings: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of its body (functions included;
    ``TYPE_CHECKING`` blocks too, which only makes the check stricter), and with ``strings`` the ones it
    imports by name (:func:`string_imports`)."""
    modules = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
        if strings:
            graph[name].update(string_imports(ast.parse(f.read_text()), name, package, modules))
    return graph


def string_imports(tree: ast.AST, name: str, package: str, modules: Iterable[str]) -> set[str]:
    """Package modules a module names to import them by string: a dotted module name in a string
    constant (the plugin manager's default plugins), and for each ``import_module(f"PREFIX{...}")``
    every string constant that completes the prefix to a module (a table of lazily imported names:
    the package root's, ``moe_unfuse.plugin``'s, the CLI's commands)."""
    modules = set(modules)
    consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    found = {c for c in consts if "." in c and c in modules}
    for node in ast.walk(tree):
        func = node.func if isinstance(node, ast.Call) else None
        if getattr(func, "attr", getattr(func, "id", None)) != "import_module" or not node.args:
            continue
        arg, prefix = node.args[0], ""
        for part in arg.values if isinstance(arg, ast.JoinedStr) else ():
            if isinstance(part, ast.Constant):
                prefix += part.value
            elif isinstance(part.value, ast.Name) and part.value.id in ("__package__", "__name__"):
                prefix += package
            else:
                break
        if prefix.startswith("."):
            prefix = package + prefix
        found.update(prefix + c for c in consts if prefix and prefix + c in modules)
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_function_level_and_string_imports() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["moe_unfuse.core.unfusing"] >= {
        "moe_unfuse.core.plan",
        "moe_unfuse.core.experts",
        "moe_unfuse.core.drift",
    }
    assert "moe_unfuse.cli.commands.quantize" in graph["moe_unfuse.default_plugins.commands"]  # by string, counted
    assert "moe_unfuse.core.plan" in graph["moe_unfuse.plugin"]  # its lazy table
    importer, prefix = DECLARED_EXCEPTION
    loaded = {m for m in graph[importer] if m.startswith(prefix)}
    assert len(loaded) >= 7
    assert [len(c) for c in cycles(graph)] != [], "the declared exception closes a cycle: it must be seen"
    graph[importer] -= loaded
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_the_checker_sees_a_cycle_through_a_string_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "import importlib\nNAMES = ('b',)\ndef f(n):\n    return importlib.import_module(f'pkg.{n}')\n"
    )
    (pkg / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg, strings=False)) == []
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_default_plugins_use_only_the_public_plugin_api() -> None:
    """A built-in plugin is an example to copy: it may import from moe_unfuse only what a third-party
    plugin can, ``moe_unfuse.plugin``."""
    graph = import_graph(strings=False)
    plugins = {m: deps for m, deps in graph.items() if m.startswith("moe_unfuse.default_plugins.")}
    assert len(plugins) >= 7
    assert {
        m: sorted(deps - {"moe_unfuse.plugin"}) for m, deps in plugins.items() if deps - {"moe_unfuse.plugin"}
    } == {}


#: The package's folders, lowest first: a module may import only from its own folder and those
#: before it. The package root (``moe_unfuse``, its lazy public API ``moe_unfuse.plugin`` and
#: ``__main__``) sits over every folder, and the default plugins over it, since they use that API.
LAYERS = ("base", "plugins", "spec", "core", "hub", "quant", "tools", "cli", "", "default_plugins")


def layer(module: str) -> int:
    """The rank in :data:`LAYERS` of a package module's folder (a root module ranks as the root)."""
    parts = module.split(".")[1:]
    folder = parts[0] if len(parts) > 1 or (parts and parts[0] in LAYERS) else ""
    assert folder in LAYERS, f"{module} is in no layer: add its folder to LAYERS"
    return LAYERS.index(folder)


def test_every_module_imports_only_its_own_folder_and_those_below() -> None:
    """Counting imports inside functions and by string; the one exception is the plugin manager's
    loading of the default plugins by name."""
    graph = import_graph()
    importer, prefix = DECLARED_EXCEPTION
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if layer(d) > layer(m) and not (m == importer and d.startswith(prefix))
    )
    assert upward == []
    assert {layer(m) for m in graph} == set(range(len(LAYERS)))  # every folder holds a module


def test_the_layer_check_sees_an_upward_import() -> None:
    assert layer("moe_unfuse.base.errors") < layer("moe_unfuse.quant.export") < layer("moe_unfuse")
    assert layer("moe_unfuse.cli.commands.list") == LAYERS.index("cli")
    assert layer("moe_unfuse.plugin") == layer("moe_unfuse") < layer("moe_unfuse.default_plugins.gates")


@pytest.mark.arch("gemma4")
@pytest.mark.usefixtures("one_thread")
def test_quantize_matches_the_catalog_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one quantize matched the model against every spec twice (about 2,000 calls): now each
    spec that does not apply is asked once per module class, and only the one that does is asked again."""
    import torch

    import moe_unfuse
    from moe_unfuse.hub.tiny import byte_tokenizer, tiny_gemma4
    from moe_unfuse.spec.model import Spec

    calls: Counter[tuple[str, str]] = Counter()
    original = Spec.matches

    def counted(self: Spec, module: object) -> bool:
        calls[(self.arch, type(module).__name__)] += 1
        return original(self, module)

    monkeypatch.setattr(Spec, "matches", counted)
    model = tiny_gemma4()
    ids = {"input_ids": torch.randint(4, 200, (2, 32), generator=torch.Generator().manual_seed(0))}
    result = moe_unfuse.quantize_model(model, "fp8", [ids], progress=False)
    moe_unfuse.export_checkpoint(
        model, tmp_path / "o", specs=result.specs, qformat="fp8", tokenizer=byte_tokenizer(), progress=False
    )
    others = {key: n for key, n in calls.items() if key[0] != "gemma4"}
    assert len({arch for arch, _ in others}) == len(moe_unfuse.list_specs()) - 1
    assert max(others.values()) == 1, [k for k, n in others.items() if n > 1][:5]
