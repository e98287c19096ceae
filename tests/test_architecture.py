"""The house rules of docs/architecture.md, read from the source: who may import whom.

Every `import` / `from ... import` in megatron_ext/ counts, also those inside functions (they run
too, only later). The rules are checked on this graph, and each check is shown to fail on a
deliberately broken graph, so a passing run means the rule holds, not that the check is blind.
"""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_ext"
ARCHITECTURE_PAGE = PACKAGE.parent / "docs" / "architecture.md"
LOOP_MODULES = "megatron_ext.training"  # the loop and its command: the top of the house

# The floors of the house, lowest first (packages and top-level modules of megatron_ext). A module imports its own
# package and packages on lower floors only: never one on its own floor or above. docs/architecture.md draws this
# table (checked below); a new package gets its floor here first.
FLOORS = (
    ("errors", "lazy"),  # standard library only: the one error type, lazy package attributes
    ("rope", "sizes", "context_parallel"),  # the RoPE math (and Hugging Face's forms of it), model-size arithmetic,
    # which tokens each context-parallel rank holds
    ("compat", "data"),  # what megatron-core needs on this machine; tokenizers and datasets
    ("config", "distributed"),  # the settings; process groups
    ("checkpoint",),  # layout, state, store
    ("models",),  # megatron-core integration
    ("convert",),  # Hugging Face <-> megatron_ext
    ("hf",),  # the transformers loader of HARPE exports
    ("eval", "launch", "serve", "training"),  # the commands
    ("repro",),  # the study: runs training children and evaluates them
    ("cli",),  # the command table
)
FLOOR_OF = {f"megatron_ext.{name}": level for level, names in enumerate(FLOORS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (`from a import b` counts a.b when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """megatron_ext module -> the megatron_ext modules (and third-party top-level names) it imports."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path):
            if imported.startswith("megatron_ext"):
                while imported not in modules and "." in imported:  # `from pkg import name`: name is no module
                    imported = imported.rsplit(".", 1)[0]
                if imported in modules and imported != name:
                    edges.add(imported)
            else:
                edges.add(imported)
        graph[name] = edges
    return graph


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, as 'importer -> imported (rule)'."""
    found = []
    for module, edges in graph.items():
        for imported in edges:
            if inside(module, "megatron_ext.rope") and (inside(imported, "megatron") or
                                                        inside(imported, "megatron.core")):
                found.append(f"{module} -> {imported} (rope/ imports no megatron)")
            if imported == "megatron_ext.cli" and module != "megatron_ext.cli":
                found.append(f"{module} -> {imported} (nothing imports the CLI)")
            if inside(module, "megatron_ext.training") and inside(imported, "megatron_ext.launch"):
                found.append(f"{module} -> {imported} (training/ imports no launch/)")
            if any(inside(module, f"megatron_ext.{low}") for low in ("launch", "eval", "convert")) \
                    and inside(imported, LOOP_MODULES):
                found.append(f"{module} -> {imported} (launch/, eval/, convert/ import no training loop module)")
    return found


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a package on the importer's own floor or above, and every package without a floor."""
    found = []
    for module, edges in graph.items():
        source = package_of(module)
        if module == "megatron_ext" and not any(e.startswith("megatron_ext.") for e in edges):
            continue  # the package's own __init__: its version, nothing imported
        if source not in FLOOR_OF:
            found.append(f"{module}: package {source} has no floor in FLOORS")
            continue
        for imported in sorted(e for e in edges if e.startswith("megatron_ext.") and package_of(e) != source):
            target = package_of(imported)
            if FLOOR_OF.get(target, len(FLOORS)) >= FLOOR_OF[source]:
                found.append(f"{module} -> {imported} (floor {FLOOR_OF[source]} imports floor "
                             f"{FLOOR_OF.get(target, '?')}: imports only go down)")
    return found


def drawn_floors(page: str) -> list[tuple[str, ...]]:
    """The floor table drawn in docs/architecture.md: the lines `floor N  name name ...` of its floors section."""
    section = page.split("## The floors", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for line in section.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] != "floor":
            continue
        names = []
        for word in words[2:]:  # the packages (`name/`) and modules (`name.py`) up to the description
            if not re.fullmatch(r"[a-z_]+(/|\.py)", word):
                break
            names.append(word.rstrip("/").removesuffix(".py"))
        floors[int(words[1])] = tuple(sorted(names))
    return [floors[level] for level in sorted(floors)]


def package_of(module: str) -> str:
    """megatron_ext.eval.models -> megatron_ext.eval; top-level modules are their own package."""
    return ".".join(module.split(".")[:2])


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between megatron_ext's packages (and top-level modules), found by depth-first search."""
    packages: dict[str, set[str]] = {}
    for module, edges in graph.items():
        source = package_of(module)
        packages.setdefault(source, set()).update(
            package_of(e) for e in edges if e.startswith("megatron_ext") and package_of(e) != source)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(packages.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(packages):
        if node not in state:
            visit(node, [node])
    return cycles


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_import_rule_holds(graph):
    assert violations(graph) == []


def test_imports_only_go_down_the_floors(graph):
    assert floor_violations(graph) == []


@pytest.mark.parametrize("importer, imported", [
    ("megatron_ext.data.dataset", "megatron_ext.models.gpt"),  # up
    ("megatron_ext.eval.models", "megatron_ext.launch.memory"),  # across one floor
    ("megatron_ext.hf.rotary", "megatron_ext.eval.models"),  # up
])
def test_a_deliberate_floor_violation_is_caught(graph, importer, imported):
    broken = {module: set(edges) for module, edges in graph.items()}
    broken[importer].add(imported)
    assert any(line.startswith(f"{importer} -> {imported}") for line in floor_violations(broken))


def test_a_package_without_a_floor_is_caught(graph):
    assert floor_violations({"megatron_ext.attic.thing": {"megatron_ext.rope"}}) == [
        "megatron_ext.attic.thing: package megatron_ext.attic has no floor in FLOORS"]


def test_the_architecture_page_draws_the_floor_table():
    assert drawn_floors(ARCHITECTURE_PAGE.read_text()) == [tuple(sorted(names)) for names in FLOORS]


def test_packages_import_one_another_without_a_cycle(graph):
    assert package_cycles(graph) == []


@pytest.mark.parametrize("importer, imported", [
    ("megatron_ext.rope.apply", "megatron.core"),
    ("megatron_ext.convert.cli", "megatron_ext.cli"),
    ("megatron_ext.training.train", "megatron_ext.launch.slurm"),
    ("megatron_ext.eval.models", "megatron_ext.training.train"),
    ("megatron_ext.launch.memory", "megatron_ext.training.metrics"),
])
def test_a_deliberate_violation_is_caught(graph, importer, imported):
    broken = {module: set(edges) for module, edges in graph.items()}
    broken[importer].add(imported)
    assert any(line.startswith(f"{importer} -> {imported}") for line in violations(broken))


def test_a_deliberate_cycle_is_caught(graph):
    broken = {module: set(edges) for module, edges in graph.items()}
    broken["megatron_ext.rope.config"].add("megatron_ext.models.gpt")  # models already imports rope
    assert any({"megatron_ext.rope", "megatron_ext.models"} <= set(cycle) for cycle in package_cycles(broken))


def test_the_graph_sees_imports_inside_functions(graph):
    # the CLI imports every command's module inside build_parser, by name; the train command imports the loop lazily
    assert "megatron_ext.training.train" in graph["megatron_ext.training.cli"]


def lazy_tables() -> dict[str, tuple[dict, dict, list]]:
    """Per package that loads names on first use: (its table name -> module, its TYPE_CHECKING imports name ->
    module, its __all__); the imports read from the source, the rest from the (light) package itself."""
    import importlib

    tables = {}
    for path in PACKAGE.rglob("__init__.py"):
        if "_LOADED_ON_FIRST_USE" not in path.read_text():
            continue
        package = importlib.import_module(module_name(path))
        typed = {}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                for statement in node.body:
                    typed.update({alias.name: statement.module for alias in statement.names})
        tables[module_name(path)] = (package._LOADED_ON_FIRST_USE, typed, list(package.__all__))
    return tables


def test_names_loaded_on_first_use_are_typed_and_exported_alike():
    """A package's lazy table, its TYPE_CHECKING imports and its __all__ name the same things: a name added to the
    table alone would be invisible to type checkers and `from package import *`."""
    tables = lazy_tables()
    assert {"megatron_ext.data", "megatron_ext.convert"} <= set(tables)
    for package, (table, typed, exported) in tables.items():
        assert typed == table, package
        assert set(table) <= set(exported), (package, sorted(set(table) - set(exported)))
