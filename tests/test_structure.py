"""The shape of the codebase: imports run one way, scripts do not import scripts."""

import ast

from conftest import ROOT

SCRIPTS = {"train", "finetune", "evaluate", "sample", "bench", "bench_data"}
# the one exception: fine-tuning and benchmarking reuse the training loop
SCRIPT_IMPORTS_ALLOWED = {("finetune", "train"), ("bench", "train")}


def project_modules():
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files.update({f"prepare.{p.stem}": p for p in (ROOT / "prepare").glob("*.py") if p.stem != "__init__"})
    return files


def imports_of(path, known):
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def test_no_import_cycles_even_inside_functions():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [name, dep])}"
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_scripts_do_not_import_scripts():
    modules = project_modules()
    for script in SCRIPTS:
        for dep in imports_of(modules[script], modules) & SCRIPTS:
            assert (script, dep) in SCRIPT_IMPORTS_ALLOWED, f"{script}.py imports the script {dep}.py"
    for name, path in modules.items():  # shared modules import no script at all
        if name not in SCRIPTS and name != "lm_eval_adapter":
            assert not imports_of(path, modules) & SCRIPTS, f"{name} imports a script"
    assert not imports_of(modules["lm_eval_adapter"], modules) & SCRIPTS


def test_model_is_the_transformer_only():
    """model.py imports nothing of the project: generation, GPT-2 weights, adapters live elsewhere."""
    modules = project_modules()
    assert imports_of(modules["model"], modules) == set()
    source = modules["model"].read_text()
    for elsewhere in ("def generate", "class KVCache", "def from_hf", "class LoRALinear", "class GPTClassifier"):
        assert elsewhere not in source


def test_walkthrough_names_tests_that_exist():
    """docs/WALKTHROUGH.md maps README claims to tests; each named test must be there."""
    import re
    text = (ROOT / "docs" / "WALKTHROUGH.md").read_text()
    current = None
    for path, name in re.findall(r"`(?:(tests/\w+\.py))?::(\w+)`", text):
        current = path or current
        assert f"def {name}(" in (ROOT / current).read_text(), f"{current}::{name}"
    assert "tests/test_structure.py" in text


def test_walkthrough_line_ranges_show_what_they_name():
    """Each reading-order row gives line ranges and names what to look for there in backticks;
    the names must stand within those lines, so the ranges follow the code as it moves."""
    import re
    rows = re.findall(r"^\| `([\w/]+\.py)` \| ([\d–, ]+) \| (.*) \|$", (ROOT / "docs" / "WALKTHROUGH.md").read_text(),
                      re.M)
    assert len(rows) > 20
    for path, ranges, what in rows:
        lines = (ROOT / path).read_text().split("\n")
        shown = "\n".join("\n".join(lines[int(a) - 1:int(b)]) for a, b in re.findall(r"(\d+)–(\d+)", ranges))
        names = re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", what)
        missing = [n for n in names if n.split(".")[-1] not in shown]
        assert not missing, f"{path} {ranges}: {missing} not in those lines"
