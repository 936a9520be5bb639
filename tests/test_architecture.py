"""The package's dependencies run one way: no import cycle, counting imports inside functions; and a
quantize job matches the model against the spec catalog once."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_unfuse"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth of its body (functions included;
    ``TYPE_CHECKING`` blocks too, which only makes the check stricter)."""
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
    return graph


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


def test_no_import_cycle_counting_function_level_imports() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["moe_unfuse.unfusing"] >= {
        "moe_unfuse.plan",
        "moe_unfuse.experts",
        "moe_unfuse.drift",
    }
    assert cycles(graph) == []


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_layers_run_down() -> None:
    """Data and mechanism never import the integrations above them."""
    graph = import_graph()
    low = [
        "errors",
        "options",
        "versions",
        "layout",
        "kinds",
        "hookspecs",
        "plugins",
        "spec",
        "catalog",
        "plan",
        "experts",
    ]
    high = {"quantize", "export", "verify", "golden", "audit", "cli", "calibration", "naming", "registration"}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    for name in low:
        above = {m.rsplit(".", 1)[-1] for m in reach(f"moe_unfuse.{name}")} & high
        assert not above, f"moe_unfuse.{name} reaches {sorted(above)}"


@pytest.mark.arch("gemma4")
@pytest.mark.usefixtures("one_thread")
def test_quantize_matches_the_catalog_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one quantize matched the model against every spec twice (about 2,000 calls): now each
    spec that does not apply is asked once per module class, and only the one that does is asked again."""
    import torch

    import moe_unfuse
    from moe_unfuse.spec import Spec
    from moe_unfuse.tiny import byte_tokenizer, tiny_gemma4

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
