"""The type stubs of the compiled module (pwconv_cy/_core.pyi) stay in step with it: the same
public names, each of the same kind (function, class, constant, method, property), functions and
methods with the same parameters, and every parameter and return typed with names that exist.

The stub and py.typed are checked where they are installed, next to the compiled module.  Cython's
binding (the default in Cython 3) gives inspect.signature for def functions and methods; the
signature of a cdef class's __init__ comes from the class docstring (embedsignature=True)."""
import ast
import builtins
import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import pwconv_cy
from pwconv_cy import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
# Members Cython gives every extension type by itself; __init__ is compared separately.
CYTHON_MEMBERS = {"__doc__", "__new__", "__reduce__", "__setstate__", "__reduce_cython__",
                  "__setstate_cython__", "__pyx_vtable__", "__init__"}
# Stands for a name the annotation check cannot look into (a type alias, typing_extensions).
UNCHECKED = object()


def _stub_tree() -> ast.Module:
    assert STUB.is_file(), f"the stub {STUB} was not installed next to {_core.__file__}"
    return ast.parse(STUB.read_text(encoding="utf-8"), filename=str(STUB))


def _is_type_alias(node) -> bool:
    return isinstance(node, ast.AnnAssign) and isinstance(node.annotation, ast.Name) \
        and node.annotation.id == "TypeAlias"


def _members(body) -> dict:
    """Name -> FunctionDef / ClassDef / AnnAssign of a stub body (aliases, i.e. plain
    assignments, and imports are not members)."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and not _is_type_alias(node):
            out[node.target.id] = node
    return out


def _is_property(node) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def _stub_parameters(fn: ast.FunctionDef) -> tuple:
    """(names in order, with * / ** for variadics; the names that have defaults)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    names = [p.arg for p in positional]
    if a.vararg is not None:
        names.append("*" + a.vararg.arg)
    names += [p.arg for p in a.kwonlyargs]
    if a.kwarg is not None:
        names.append("**" + a.kwarg.arg)
    defaults = {p.arg for p in positional[len(positional) - len(a.defaults):]}
    defaults |= {p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
    return names, defaults


def _runtime_parameters(obj) -> tuple:
    names, defaults = [], set()
    for p in inspect.signature(obj).parameters.values():
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
        if p.default is not p.empty:
            defaults.add(p.name)
    return names, defaults


def _split_top_level(text: str) -> list:
    """Splits a C-style argument list at the commas outside brackets (memoryview types such as
    ``const double[:, ::1] queries`` hold commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _runtime_init_parameters(cls) -> tuple:
    """Parameters of a cdef class's __init__ from the signature Cython embeds in the class
    docstring, e.g. ``SearchIndex(points, const int64_t[::1] offsets, double cell_size=1.0)``."""
    doc = cls.__doc__ or ""
    match = re.match(rf"{cls.__name__}\((.*)\)\s*$", doc.split("\n", 1)[0])
    assert match, (f"_core.{cls.__name__} defines __init__ but its docstring carries no signature; "
                   "_core.pyx must be compiled with the directive embedsignature=True")
    names, defaults = ["self"], set()
    for arg in _split_top_level(match.group(1)):
        decl, has_default, _ = arg.partition("=")
        star = re.match(r"\**", decl.strip()).group(0)
        name = star + re.findall(r"\w+", decl)[-1]
        names.append(name)
        if has_default:
            defaults.add(name)
    return names, defaults


def _compare_parameters(where: str, stub_fn: ast.FunctionDef, runtime: tuple, problems: list):
    stub = _stub_parameters(stub_fn)
    if stub[0] != runtime[0]:
        problems.append(f"{where}: stub parameters {stub[0]} != compiled {runtime[0]}")
    elif stub[1] != runtime[1]:
        problems.append(f"{where}: parameters with defaults: stub {sorted(stub[1])} != "
                        f"compiled {sorted(runtime[1])}")


def _kind(obj) -> str:
    if isinstance(obj, type):
        return "class"
    if callable(obj):
        return "function"
    return "constant"


def _stub_kind(node) -> str:
    return {ast.ClassDef: "class", ast.FunctionDef: "function"}.get(type(node), "constant")


def test_stub_and_py_typed_ship_with_the_package():
    assert STUB.is_file(), f"{STUB} is missing: the wheel must ship pwconv_cy/_core.pyi"
    marker = Path(pwconv_cy.__file__).with_name("py.typed")
    assert marker.is_file(), f"{marker} is missing: the wheel must ship py.typed (PEP 561)"


def test_stub_declares_exactly_the_public_names_of_the_module():
    stub = _members(_stub_tree().body)
    public = {name for name in dir(_core) if not name.startswith("_")
              and not isinstance(getattr(_core, name), types.ModuleType)}
    stub_public = {name for name in stub if not name.startswith("_")}
    missing, extra = sorted(public - stub_public), sorted(stub_public - public)
    assert not missing and not extra, (
        f"_core.pyi is out of step with _core.pyx: missing from the stub {missing}, "
        f"in the stub but not in the module {extra}")
    absent = sorted(name for name in stub if not hasattr(_core, name))
    assert not absent, f"_core.pyi declares private names the module lacks: {absent}"
    wrong_kind = [f"{name}: stub {_stub_kind(node)}, compiled {_kind(getattr(_core, name))}"
                  for name, node in stub.items() if _stub_kind(node) != _kind(getattr(_core, name))]
    assert not wrong_kind, f"_core.pyi declares members of the wrong kind: {wrong_kind}"


def test_stub_functions_have_the_compiled_parameters():
    problems = []
    for name, node in _members(_stub_tree().body).items():
        if isinstance(node, ast.FunctionDef) and hasattr(_core, name):
            _compare_parameters(name, node, _runtime_parameters(getattr(_core, name)), problems)
    assert not problems, "\n".join(problems)


def test_stub_classes_have_the_compiled_members_and_parameters():
    problems = []
    for cls_name, cls_node in _members(_stub_tree().body).items():
        if not isinstance(cls_node, ast.ClassDef) or not hasattr(_core, cls_name):
            continue
        cls = getattr(_core, cls_name)
        stub = _members(cls_node.body)
        runtime = {name: value for name, value in vars(cls).items() if name not in CYTHON_MEMBERS}
        missing, extra = sorted(set(runtime) - set(stub) - {"__init__"}), sorted(
            set(stub) - set(runtime) - {"__init__"})
        if missing or extra:
            problems.append(f"{cls_name}: missing from the stub {missing}, not compiled {extra}")
        for name in sorted(set(runtime) & set(stub)):
            value, node = runtime[name], stub[name]
            is_data = inspect.isdatadescriptor(value)
            if is_data != (_is_property(node) or isinstance(node, ast.AnnAssign)):
                problems.append(f"{cls_name}.{name}: compiled as a "
                                f"{'property/attribute' if is_data else 'method'}, stubbed as "
                                f"{'a property/attribute' if not is_data else 'a method'}")
            elif not is_data and not isinstance(value, types.WrapperDescriptorType):
                _compare_parameters(f"{cls_name}.{name}", node, _runtime_parameters(value),
                                    problems)
        if "__init__" in vars(cls):
            if "__init__" not in stub:
                problems.append(f"{cls_name}: __init__ is not in the stub")
            else:
                _compare_parameters(f"{cls_name}.__init__", stub["__init__"],
                                    _runtime_init_parameters(cls), problems)
        elif "__init__" in stub:
            problems.append(f"{cls_name}: the stub declares __init__, the compiled class has none")
    assert not problems, "\n".join(problems)


def _stub_namespace(tree: ast.Module, problems: list) -> dict:
    """What the stub's annotations may name: builtins, its imports, its type aliases and the
    module's classes.  Names from typing_extensions (bundled with type checkers, maybe not
    installed) and aliases resolve to UNCHECKED: only their presence is checked."""
    namespace = dict(vars(builtins))
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name if alias.asname else alias.name.split(".")[0]
                namespace[alias.asname or top] = importlib.import_module(top)
        elif isinstance(node, ast.ImportFrom):
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                if node.module != "typing_extensions":
                    raise
                module = None
            for alias in node.names:
                if module is not None and not hasattr(module, alias.name):
                    problems.append(f"from {node.module} import {alias.name}: no such name")
                namespace[alias.asname or alias.name] = getattr(module, alias.name, UNCHECKED)
        elif _is_type_alias(node) or isinstance(node, ast.Assign):
            for target in [node.target] if isinstance(node, ast.AnnAssign) else node.targets:
                namespace[target.id] = UNCHECKED
    for name, node in _members(tree.body).items():
        if isinstance(node, ast.ClassDef) and hasattr(_core, name):
            namespace[name] = getattr(_core, name)
    return namespace



def _unresolved(expr: ast.expr, namespace: dict) -> list:
    """The names and dotted attributes of an annotation that do not exist (e.g. ``np.int46``);
    resolved without evaluating the expression, so ``X | None`` is fine on Python 3.9 too."""
    missing = []
    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id not in namespace:
            missing.append(node.id)
        elif isinstance(node, ast.Attribute):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.insert(0, root.attr)
                root = root.value
            if not isinstance(root, ast.Name) or namespace.get(root.id, UNCHECKED) is UNCHECKED:
                continue
            obj = namespace[root.id]
            for i, attr in enumerate(chain):
                if not hasattr(obj, attr):
                    missing.append(".".join([root.id] + chain[:i + 1]))
                    break
                obj = getattr(obj, attr)
    return missing


def test_stub_is_fully_typed_with_names_that_resolve():
    """Every parameter but self and every return is annotated, and every name an annotation or a
    type alias uses exists."""
    tree = _stub_tree()
    problems, annotations = [], []
    namespace = _stub_namespace(tree, problems)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            a = node.args
            params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
            for p in params:
                if p.annotation is None and p.arg not in ("self", "cls"):
                    problems.append(f"{node.name}({p.arg}) has no annotation")
                elif p.annotation is not None:
                    annotations.append((f"{node.name}({p.arg})", p.annotation))
            if node.returns is None:
                problems.append(f"{node.name} has no return annotation")
            else:
                annotations.append((f"{node.name} -> ", node.returns))
        elif isinstance(node, ast.AnnAssign):
            annotations.append((f"{node.target.id}: ", node.annotation))
            if node.value is not None:
                annotations.append((f"{node.target.id} = ", node.value))
        elif isinstance(node, ast.Assign):
            annotations.append((f"{node.targets[0].id} = ", node.value))
    assert len(annotations) > 50, "the stub's annotations were not found"
    for where, expr in annotations:
        missing = _unresolved(expr, namespace)
        if missing:
            problems.append(f"{where}: unknown names {missing}")
    assert not problems, "\n".join(problems)


def test_stub_constants_have_their_runtime_types():
    by_name = {"bool": bool, "bytes": bytes, "float": float, "int": int, "str": str}
    checked = 0
    for name, node in _members(_stub_tree().body).items():
        if isinstance(node, ast.AnnAssign) and isinstance(node.annotation, ast.Name):
            expected = by_name.get(node.annotation.id)
            if expected is not None and hasattr(_core, name):
                value = getattr(_core, name)
                assert type(value) is expected, (
                    f"_core.{name} is {type(value).__name__} ({value!r}), stubbed as "
                    f"{node.annotation.id}")
                checked += 1
    assert checked >= 3, "the stub's build constants (COMPILER, ...) were not found"


@pytest.mark.parametrize("source, expected", [
    ("points, const int64_t[::1] offsets, double cell_size",
     ["points", "const int64_t[::1] offsets", "double cell_size"]),
    ("const double[:, ::1] q, int k=3", ["const double[:, ::1] q", "int k=3"]),
    ("", []),
])
def test_split_top_level_keeps_memoryview_commas(source, expected):
    assert _split_top_level(source) == expected
