"""The architecture diagram in the README, enforced: every `lowbit` import points down the stack."""
from __future__ import annotations

import ast
from pathlib import Path

import lowbit

# Top to bottom, as the README's diagram lists them; a module may import its own layer and any layer below.
LAYERS = [
    ["cli", "__init__"],          # the CLI, and the package's facade (lowbit.load, lowbit.LLM, ...: lazy)
    ["server"],           # the OpenAI-compatible HTTP server on the engine
    ["compare"],
    ["export"],           # GGUF (llama.cpp) and ONNX exports of a loaded model
    ["train"],            # QAT and distillation: trains through the models, PTQ methods and sampling below
    ["eval"],
    ["engine", "generate"],
    ["quant"],
    ["models"],
    ["formats"],          # compressed-tensors / GPTQ / AWQ tensors <-> lowbit layers
    ["layers"],
    ["kernels"],
    ["analysis"],
    ["sampling", "stopping", "text", "files", "device", "atomic", "config", "errors"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
ROOT = Path(lowbit.__file__).parent


def _unit(module: str) -> str:
    """lowbit.quant.walk -> quant; lowbit.config -> config; lowbit -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lowbit"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lowbit":      # from lowbit import compare -> lowbit.compare
                out += [(node.lineno, f"lowbit.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "lowbit":
                out.append((node.lineno, node.module))
    return out


def test_every_module_has_a_layer():
    units = {_unit("lowbit." + ".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in ROOT.rglob("*.py")}
    assert units <= set(LEVEL), sorted(units - set(LEVEL))


def test_imports_point_down_the_stack():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit("lowbit." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in _imports(path):
            dst = _unit(module)
            if dst in LEVEL and LEVEL[dst] < LEVEL[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({src} -> {dst} points up)")
    assert not bad, "\n".join(bad)


def test_named_pairs_do_not_import_each_other():
    """The issue's pairs: kernels import neither quant nor engine; models/quant and eval/quant never meet."""
    forbidden = {("kernels", "quant"), ("kernels", "engine"), ("models", "quant"), ("quant", "models"),
                 ("eval", "quant"), ("quant", "eval"), ("engine", "generate"), ("layers", "quant")}
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit("lowbit." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in _imports(path):
            if (src, _unit(module)) in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)
