"""The package's shape, read from its source: no import circle among minillm's modules, imports
running one way (tools -> API -> loader -> adapters -> core -> kernels), `import minillm` cheap."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"minillm": ROOT / "minillm", "minillm.archs": ROOT / "archs", "minillm.kernels": ROOT / "kernels"}
# the core: what a Decoder is made of; it never reaches up into loading, adapters or tools
CORE = {"minillm.config", "minillm.layers", "minillm.model", "minillm.attention", "minillm.cache",
        "minillm.mla", "minillm.moe", "minillm.rope", "minillm.cpu", "minillm.errors"}
ABOVE_CORE = ("minillm.archs", "minillm.loader", "minillm.locate", "minillm.api", "minillm.cli",
              "minillm.bench", "minillm.verify", "minillm.info", "minillm.engine", "minillm.server")


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel))
            out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Every minillm module `name` imports, at the top or inside a function."""
    pkg = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {name: imports(name, f, known) for name, f in mods.items()}
    for name in g:   # a package's __init__ is not a dependency of its own submodules' users
        g[name] = {t for t in g[name] if not name.startswith(t + ".")}
    return g


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(g[n]):
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2
    for n in sorted(g):
        if n not in state:
            visit(n, [n])


def test_imports_run_one_way():
    g = graph()
    for name, deps in g.items():
        if name in CORE:
            up = {d for d in deps if d.startswith(ABOVE_CORE)}
            assert not up, f"core module {name} imports {sorted(up)}"
        if name.startswith("minillm.kernels"):
            model = {d for d in deps if not d.startswith("minillm.kernels")}
            assert not model, f"kernel module {name} imports {sorted(model)}"
        if name.startswith("minillm.archs"):
            up = {d for d in deps if d.startswith(ABOVE_CORE) and not d.startswith("minillm.archs")}
            assert not up, f"adapter {name} imports {sorted(up)}"


def test_import_minillm_is_cheap():
    code = "import sys, minillm; print(sorted(m for m in ('torch', 'transformers', 'minillm.loader') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_every_package_is_installed():
    """pyproject lists packages by hand (archs/ and kernels/ live outside minillm/): a new
    subpackage missing there works in a checkout and is absent from a wheel."""
    import re   # not tomllib: Python 3.10 has none
    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)[1]
    listed = set(re.findall(r'"([\w.]+)"', line))
    found = {name for name, f in modules().items() if f.name == "__init__.py"}
    assert found == listed, f"not in pyproject: {sorted(found - listed)}; listed, not found: {sorted(listed - found)}"
