"""The package's shape, read from the installed package's source with `ast` (function-local imports too):
no import cycles, nothing outside `shortllm.cli` imports it, no re-export shims, no module named like a
public function, every `--flag` an error message suggests exists, and the CLI tests run the installed
package."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shortllm

PKG_ROOT = Path(shortllm.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG_ROOT.rglob("*.py")):
        rel = path.relative_to(PKG_ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """Every shortllm module `module` imports, anywhere in its body (function-local imports included)."""
    found: set[str] = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(module, node)
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import shortllm.x.y` of a name that is not a module: its module
                t = t.rpartition(".")[0]
            if t and t != module and t.startswith("shortllm"):
                found.add(t)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_graph_sees_imports():
    # guard against a parser that finds nothing (which would make the cycle test pass vacuously)
    assert "shortllm.scoring.collectors" in GRAPH["shortllm.scoring.engine"]
    assert "shortllm.scoring.ppl" in GRAPH["shortllm.scoring.engine"]  # function-local import
    assert "shortllm.ops._backend" in GRAPH["shortllm.ops.cosine"]  # relative import of a module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_zero_import_cycles():
    assert _cycles(GRAPH) == []


def test_nothing_outside_the_cli_imports_it():
    bad = {m: sorted(t for t in deps if t.startswith("shortllm.cli"))
           for m, deps in GRAPH.items() if not m.startswith("shortllm.cli")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_stage_packages_exist_and_inits_import_nothing():
    for pkg in ("model", "data", "ops", "io", "scoring", "pruning", "evaluation", "retrain", "testing", "cli"):
        assert f"shortllm.{pkg}" in MODULES, pkg
    for name, tree in TREES.items():
        if _is_package(name) and name not in ("shortllm", "shortllm.ops"):
            imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                       and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
            assert not imports, f"{name}/__init__.py imports (a re-export shim?)"


def _public_defs() -> dict[str, str]:
    out = {}
    for name, tree in TREES.items():
        for node in tree.body:
            is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if is_def and not node.name.startswith("_"):
                out[node.name] = name
    return out


def test_no_module_is_named_like_a_public_function():
    defs = _public_defs()
    exported = set(shortllm._EXPORTS)
    clashes = sorted({m.rpartition(".")[2] for m in MODULES} & (set(defs) | exported))
    assert clashes == [], f"modules named like public functions/classes: {clashes}"
    import importlib
    import types

    for name in exported:
        assert not isinstance(getattr(shortllm, name), types.ModuleType), name
    for m in MODULES:
        if not m.endswith("__main__"):
            assert type(importlib.import_module(m)) is types.ModuleType, f"{m}: a module with a swapped class"


def _names_used(tree: ast.AST) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            root = node
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name):
                used.add(root.id)
    strings = " ".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return used | set(re.findall(r"[A-Za-z_]\w*", strings))  # names in string annotations count as used


def test_no_re_export_shims():
    """Every name a module imports from shortllm it also uses: nothing is imported only to be re-exported."""
    shims = []
    for name, tree in TREES.items():
        used = _names_used(ast.Module(body=[n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))],
                                      type_ignores=[]))
        for node in ast.walk(tree):
            top_level = node in tree.body if isinstance(node, ast.ImportFrom) else False
            if top_level and _absolute(name, node).startswith("shortllm"):
                for alias in node.names:
                    bound = alias.asname or alias.name
                    # `_cpu`/`_cuda` are imported to find out whether the extension was built
                    if bound not in used and alias.name not in ("_cpu", "_cuda"):
                        shims.append(f"{name}: {bound}")
    assert shims == []


def _cli_options() -> set[str]:
    from shortllm.cli.app import build_parser

    opts: set[str] = set()
    parser = build_parser()
    actions = list(parser._actions)
    for a in parser._actions:  # argparse keeps subparsers in a _SubParsersAction
        for sub in getattr(a, "choices", None) or {}:
            if isinstance(a.choices, dict):
                actions += a.choices[sub]._actions
    for a in actions:
        opts.update(o for o in a.option_strings if o.startswith("--"))
    return opts


def _message_strings(tree: ast.AST):
    """String pieces of raised errors and warnings (what a user reads), not e.g. subprocess argument lists."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) or (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "warn"):
            for c in ast.walk(node):
                if isinstance(c, ast.Constant) and isinstance(c.value, str):
                    yield c.value


def test_error_messages_name_only_flags_that_exist():
    opts = _cli_options()
    assert {"--metrics", "--plan", "--dtype", "--offload"} <= opts
    named: dict[str, str] = {}
    for mod, tree in TREES.items():
        for text in _message_strings(tree):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text):
                named.setdefault(flag, mod)
    assert "--dtype" in named, "the scan finds flags in messages"
    # flags of other programs that messages quote on purpose
    foreign = {"--nproc_per_node", "--index-url", "--no-build-isolation"}
    assert {f: m for f, m in named.items() if f not in opts | foreign} == {}


def test_cli_entry_point_is_the_installed_package(tmp_path):
    """`shortllm` (console script) and `python -m shortllm.cli` run the installed package, not a source tree."""
    code = "import shortllm, sys; print(shortllm.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert Path(r.stdout.strip()).resolve().parent == PKG_ROOT
    r = subprocess.run([sys.executable, "-m", "shortllm.cli", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "score" in r.stdout and "prune" in r.stdout


@pytest.mark.parametrize("cmd", ["score", "search", "prune", "eval", "retrain", "demo"])
def test_every_subcommand_has_help(cmd, tmp_path):
    r = subprocess.run([sys.executable, "-m", "shortllm.cli", cmd, "--help"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and f"usage: shortllm {cmd}" in r.stdout


def test_test_subprocesses_never_import_the_source_tree():
    """`python -m X` and `python -c ...` put the working directory first on sys.path; run from the checkout they
    would import the source tree (no compiled extension) instead of the installed package. Every such call in
    the tests must set `cwd=` (outside the checkout)."""
    tests_dir = Path(__file__).resolve().parent
    bad = []
    for path in sorted(tests_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("run", "Popen")):
                continue
            flags = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in ("-m", "-c")}
            if flags and not any(k.arg == "cwd" for k in node.keywords):
                bad.append(f"{path.name}:{node.lineno}")
    assert bad == []
