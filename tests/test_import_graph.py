"""The house's floors: bench -> launch -> data_tools -> cid_ds, each importing only the floors below it,
and no import circle among the modules (a function-level import counts: it is a circle a reader follows)."""
import ast
import os

from tests.helpers import REPO_ROOT

FLOORS = ("cid_ds", "data_tools", "launch", "bench")  # each may import those before it


def module_imports() -> dict[str, set[str]]:
    """Every module of the four packages, with the modules of the four it imports anywhere in its file."""
    files, packages = {}, set()
    for package in FLOORS:
        for folder, _, names in os.walk(os.path.join(REPO_ROOT, package)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    files[module] = path
                    if name == "__init__.py":
                        packages.add(module)
    graph = {}
    for module, path in files.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        named = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                # a relative import counts from the module's package (a package's __init__ is its own)
                package = module.split(".") if module in packages else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                source = ".".join(part for part in (base, node.module or "") if part)
                named |= {source} | {f"{source}.{alias.name}" for alias in node.names}
        graph[module] = {name for name in named if name in files and name != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif successor not in index:
                index[successor] = low[successor] = len(index)
                stack.append(successor)
                on_stack.add(successor)
                work.append((successor, iter(sorted(graph[successor]))))
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
    return found


def test_no_module_imports_a_higher_floor():
    floor = {package: level for level, package in enumerate(FLOORS)}
    upward = [f"{module} imports {name}" for module, names in module_imports().items() for name in names
              if floor[name.split(".")[0]] > floor[module.split(".")[0]]]
    assert upward == []


def test_no_import_circle():
    assert circles(module_imports()) == []


def test_a_circle_is_found_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
