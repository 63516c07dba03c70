"""Imports point one way: no package of megatron_ecdit imports a package that imports it (also
through deferred, function-level imports), and the layers below the model know nothing above."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_ecdit"


def package_graph() -> dict[str, set[str]]:
    """Top-level package (or module) -> the others it imports anywhere in its files."""
    edges: dict[str, set[str]] = defaultdict(set)
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE).parts
        source = parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("megatron_ecdit."):
                    target = name.split(".")[1]
                    if target != source:
                        edges[source].add(target)
    return edges


def test_the_package_graph_has_no_cycle():
    edges = package_graph()
    assert edges["models"] and edges["moe"]  # the scan sees imports at all

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in edges if reaches(p, p, {p}))
    assert cycles == [], {p: sorted(edges[p]) for p in cycles}


def test_layers_sit_below_moe_and_models():
    edges = package_graph()
    assert edges["layers"] <= {"config"}, edges["layers"]
    assert "models" not in edges["moe"], edges["moe"]
    for low in ("layers", "moe", "models"):
        assert not edges[low] & {"training", "parallel", "checkpoint", "pipelines", "tools"}, low
    for package, imported in edges.items():  # only the command-line tools use the pipelines
        assert package in ("tools", "pipelines") or "pipelines" not in imported, package
