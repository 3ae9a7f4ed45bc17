"""Runs pytest-style test files where pytest is not installed.

    python scripts/mini_pytest.py tests/test_ops_cuda.py [-k SUBSTRING]

Supports what this project's tests use: @pytest.mark.parametrize (stacked; ids as a
list or a callable), pytest.mark.skipif (on functions or as module `pytestmark`),
pytest.skip(), pytest.raises(..., match=...). Prints one line per failure and a
pytest-like summary; exit code 1 when anything failed.
"""

import importlib.util
import itertools
import os
import re
import sys
import time
import traceback
import types


class _Skipped(Exception):
    pass


class _Marker:
    def __init__(self, kind, **kw):
        self.kind, self.kw = kind, kw

    def __call__(self, fn):
        fn.__dict__.setdefault("_marks", []).append(self)
        return fn


class _Mark:
    def parametrize(self, names, values, ids=None):
        return _Marker("parametrize", names=[n.strip() for n in names.split(",")], values=list(values), ids=ids)

    def skipif(self, condition, reason=""):
        return _Marker("skipif", condition=condition, reason=reason)


class _Raises:
    def __init__(self, exc, match=None):
        self.exc, self.match = exc, match

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        if typ is None:
            raise AssertionError(f"DID NOT RAISE {self.exc}")
        if not issubclass(typ, self.exc):
            return False
        if self.match and not re.search(self.match, str(value)):
            raise AssertionError(f"{self.match!r} does not match {str(value)!r}")
        return True


def _skip(reason=""):
    raise _Skipped(reason)


def install_fake_pytest():
    mod = types.ModuleType("pytest")
    mod.mark = _Mark()
    mod.raises = _Raises
    mod.skip = _skip
    sys.modules["pytest"] = mod


def expand(fn):
    """(id, kwargs) for every parameter combination of fn."""
    axes = []
    for m in reversed(fn.__dict__.get("_marks", [])):  # decorators apply bottom-up
        if m.kind != "parametrize":
            continue
        names, ids = m.kw["names"], m.kw["ids"]
        entries = []
        for i, v in enumerate(m.kw["values"]):
            vals = v if len(names) > 1 else (v,)
            if callable(ids):
                label = str(ids(v))
            elif ids is not None:
                label = str(ids[i])
            else:
                label = "-".join(str(x) for x in vals)
            entries.append((label, dict(zip(names, vals))))
        axes.append(entries)
    for combo in itertools.product(*axes):
        kwargs = {}
        for _, kw in combo:
            kwargs.update(kw)
        yield "-".join(label for label, _ in combo), kwargs


def skip_reason(marks):
    for m in marks:
        if m.kind == "skipif" and m.kw["condition"]:
            return m.kw["reason"]
    return None


def run_file(path, keyword):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module_marks = getattr(module, "pytestmark", [])
    module_marks = module_marks if isinstance(module_marks, list) else [module_marks]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for name in dir(module):
        fn = getattr(module, name)
        if not (name.startswith("test_") and callable(fn)):
            continue
        for label, kwargs in expand(fn):
            test_id = f"{path}::{name}" + (f"[{label}]" if label else "")
            if keyword and keyword not in test_id:
                continue
            reason = skip_reason(module_marks + fn.__dict__.get("_marks", []))
            if reason is not None:
                counts["skipped"] += 1
                continue
            try:
                fn(**kwargs)
                counts["passed"] += 1
            except _Skipped:
                counts["skipped"] += 1
            except Exception:  # noqa: BLE001
                counts["failed"] += 1
                print(f"FAILED {test_id}\n" + "".join(traceback.format_exc().splitlines(True)[-6:]), flush=True)
    return counts


def main(argv):
    keyword = None
    if "-k" in argv:
        i = argv.index("-k")
        keyword = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    install_fake_pytest()
    start = time.time()
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for path in argv:
        for k, v in run_file(path, keyword).items():
            total[k] += v
    print(f"{total['failed']} failed, {total['passed']} passed, {total['skipped']} skipped in {time.time() - start:.1f}s (mini_pytest)")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
