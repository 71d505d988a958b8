"""The house rules of mtrain's layout, checked on the source: imports only point down the layers, no import cycles,
no mtrain import hidden inside a function, and a new model family needs only its own module, one yaml and a test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PKG = REPO_ROOT / "mtrain"

# lowest first; a module may import its own layer (without a cycle) and any layer below it
LAYERS = [
    ("mtrain._lazy", "mtrain.plots", "mtrain.disk", "mtrain.registry"),
    ("mtrain.models",),
    ("mtrain.data",),
    ("mtrain.rl",),
    ("mtrain.schema", "mtrain.config"),
    ("mtrain.parallel",),
    ("mtrain.lit",),
    ("mtrain.job",),
    ("mtrain.tasks", "mtrain.summary", "mtrain.rundir"),
    ("mtrain.cli", "mtrain.__main__"),
]


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py::LAYERS: add it where it belongs")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def mtrain_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported mtrain module, line, inside a function) of every runtime import (``TYPE_CHECKING`` blocks skipped)."""
    module, tree = module_name(path), ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_pkg, child)
                names = [base] + [f"{base}.{a.name}" for a in child.names]
                names = [n for n in names if _exists(n)] or [base]
            for name in names:
                if name == "mtrain" or name.startswith("mtrain."):
                    out.append((name, child.lineno, in_function))
            visit(child, func)

    visit(tree, False)
    if is_pkg:  # lazy exports (mtrain._lazy): each name's submodule is an import of the package
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
                out += [(f"{module}.{v.value}", node.lineno, False) for v in node.value.values]
    return out


def _exists(name: str) -> bool:
    rel = Path(*name.split("."))
    return (REPO_ROOT / rel).with_suffix(".py").is_file() or (REPO_ROOT / rel / "__init__.py").is_file()


SOURCES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_only_point_down_and_none_hides_in_a_function():
    problems = []
    for path in SOURCES:
        here = module_name(path)
        if here == "mtrain":
            continue  # the package's __init__ registers resolvers and schemas (it imports mtrain.config)
        for name, line, in_function in mtrain_imports(path):
            if name == "mtrain":
                continue
            where = f"{path.relative_to(REPO_ROOT)}:{line}"
            if layer_of(name) > layer_of(here):
                problems.append(f"{where}: {here} imports {name}, a layer above it")
            if in_function:
                problems.append(f"{where}: {here} imports {name} inside a function")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        here = module_name(path)
        graph[here] = {n for n, _, _ in mtrain_imports(path) if n != here and n != "mtrain" and n in _modules()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def _modules() -> set[str]:
    # a package's __init__ importing its own submodules is how packages work, not a cycle of the layout
    return {module_name(p) for p in SOURCES if p.name != "__init__.py"}


def test_no_module_outside_a_family_names_its_parameters():
    """GLM's router bias and shared experts are named only inside its family module (and the generic blocks that
    implement them: moe.py's routers)."""
    allowed = {PKG / "models" / "families" / "glm4_moe.py", PKG / "models" / "moe.py"}
    for path in SOURCES:
        if path in allowed:
            continue
        text = path.read_text()
        for name in ("e_score_correction_bias", "n_shared_experts", "first_k_dense_replace"):
            assert name not in text, f"{path.relative_to(REPO_ROOT)} names {name}: read it from the family instead"


TOY_FAMILY = '''
"""A toy third family for the test: Qwen3-style softmax router, no q/k norm, a dense layer every other layer."""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mtrain.models.config import MoEConfig
from mtrain.models.layers import SwiGLU
from mtrain.models.moe import Experts, MoE, SoftmaxTopKRouter
from mtrain.models.registry import ModelFamily, register
from mtrain.models.transformer import MoECausalLM


@dataclass
class ToyMoeConfig(MoEConfig):
    model_type: ClassVar[str] = "toy_moe"
    num_experts: int = 4
    dense_every: int = 2

    def is_moe_layer(self, layer_idx):
        return layer_idx % self.dense_every != 0


class ToyMoeForCausalLM(MoECausalLM):
    config_class = ToyMoeConfig

    def qk_norm(self):
        return False

    def make_mlp(self, layer_idx):
        c = self.config
        if not c.is_moe_layer(layer_idx):
            return SwiGLU(c.hidden_size, c.intermediate_size)
        gate = SoftmaxTopKRouter(c.hidden_size, c.num_experts, c.num_experts_per_tok, self.policy.moe_gate_fp32,
                                 norm_topk_prob=c.norm_topk_prob)
        return MoE(gate, Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size))


FAMILY = register(ModelFamily("toy_moe", ToyMoeConfig, ToyMoeForCausalLM))
'''

TOY_YAML = """
defaults:
  - /schema/model/toy_moe@_here_
  - _self_
name: toy_moe
checkpoint: null
dtype: ${mtrain.dtype:${trainer.precision}}
moe_gate_fp32: ${mtrain.moe_gate_fp32:${rl.mode}}
rope_fp32: ${mtrain.rope_fp32:${rl.mode}}
arch:
  num_hidden_layers: 3
"""


def test_a_third_family_is_one_module_one_yaml(tmp_path, monkeypatch):
    """A new family: its module (registered on import), its yaml in a config dir on Hydra's search path. Composed
    under rl=on, it builds, trains a step, saves and loads back exactly through checkpoint I/O, with the fp32 gate
    policy applied by the generic code (nothing else was edited)."""
    import importlib
    import shutil
    import sys

    from hydra import compose, initialize_config_dir

    from mtrain.cli import config_dir
    from mtrain.config import prepare_run
    from mtrain.job import model_from_config
    from mtrain.lit import param_groups
    from mtrain.models import FAMILIES, from_pretrained, save_pretrained
    from mtrain.schema import register_schemas

    (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path))
    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    (conf / "model" / "toy_moe.yaml").write_text(TOY_YAML)
    try:
        importlib.import_module("toy_family")
        register_schemas()
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=["model=toy_moe", "rl=on", "model.arch.hidden_size=32"])
        cfg, plan = prepare_run(cfg)
        model = model_from_config(cfg.model, plan.policy, vocab_size=64)
        assert type(model).__name__ == "ToyMoeForCausalLM" and model.moe_layers == [1]
        assert model.gate_dtype() == torch.float32 and plan.policy.moe_gate_fp32
        ids = torch.randint(0, 64, (2, 8))
        opt = torch.optim.AdamW(param_groups(model, 0.1))
        model.loss(ids, ids).backward()
        opt.step()
        save_pretrained(model, tmp_path / "ckpt")
        back = from_pretrained(tmp_path / "ckpt", policy=plan.policy, gate_mismatch="error")
        assert torch.equal(back(ids), model(ids))
        with pytest.raises(Exception, match="hidden_sze"):  # the family's schema types model.arch
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                compose("config", overrides=["model=toy_moe", "model.arch.hidden_sze=32"])
    finally:
        FAMILIES.pop("toy_moe", None)
        sys.modules.pop("toy_family", None)
        register_schemas()


@pytest.mark.parametrize("task", ["sft", "eval", "info", "mismatch", "export"])
def test_every_task_and_the_data_group_are_typed(compose_config, task):
    """Each task node is its schema dataclass and data is DataConfig, so a misspelled key anywhere (command line,
    experiment or task yaml) is refused at compose, and a wrong type too."""
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from mtrain.data.config import DataConfig
    from mtrain.schema import TASK_SCHEMAS

    cfg = compose_config([f"task={task}"])
    assert OmegaConf.get_type(cfg.task) is TASK_SCHEMAS[task]
    assert OmegaConf.get_type(cfg.data) is DataConfig
    for node, typo in ((cfg.task, "no_such_key"), (cfg.data, "num_trian")):  # what a yaml with a typo merges
        with pytest.raises(Exception, match=typo):
            OmegaConf.merge(node, {typo: 1})
    with pytest.raises(ConfigCompositionException, match="num_train"):
        compose_config([f"task={task}", "data.num_train=many"])
