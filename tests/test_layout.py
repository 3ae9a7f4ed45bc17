"""The package's layering: every module imports on its own, and no module imports another in a loop
(counting imports deferred into functions, which hide a cycle rather than remove it)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lily_ext

PACKAGE_DIR = Path(lily_ext.__file__).parent


def module_names():
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def imported_modules(name):
    """lily_ext modules that ``name`` imports anywhere in its source (top level or in a function)."""
    path = PACKAGE_DIR.parent.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = set(module_names())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_module_imports_another_in_a_loop():
    graph = {name: imported_modules(name) for name in module_names()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [c for c in (cycle_from(name) for name in graph) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_application():
    for name in module_names():
        if not name.startswith("lily_ext.app"):
            assert not {d for d in imported_modules(name) if d.startswith("lily_ext.app")}, name


def modules_the_package_does_not_import():
    """Importing any submodule imports the package first, so only these can fail on their own."""
    code = "import sys, lily_ext; print(' '.join(m for m in sys.modules if m.startswith('lily_ext')))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    return [n for n in module_names() if n not in loaded and not n.endswith("__main__")]


# Imports torch once (four of the ~4.5 s each fresh interpreter would take), then forks a child per
# module that imports it as the process's first lily_ext module; prints the names that failed.
IMPORT_EACH_IN_A_FORK = """
import os, sys, traceback
import torch
assert not [m for m in sys.modules if m.startswith("lily_ext")], "the parent imported lily_ext"
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            __import__(name)
        except BaseException:
            print(f"import {name}:", file=sys.stderr)
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print(" ".join(failed))
"""


@pytest.mark.slow
def test_every_module_imports_alone():
    names = modules_the_package_does_not_import()
    assert "lily_ext.app.cli" in names and "lily_ext.hf" in names  # the listing works
    if hasattr(os, "fork"):
        result = subprocess.run(
            [sys.executable, "-c", IMPORT_EACH_IN_A_FORK, *names], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == [], f"these do not import alone: {result.stdout}\n{result.stderr[-3000:]}"
        return
    for name in names:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"import {name}:\n{result.stderr[-2000:]}"
