"""Registries of the RL pieces (mtrain.registry): a new advantage or policy loss is one decorated function here,
chosen by its name in the config, and its own options (``task.<kind>_args``) reach it from the command line; a bad
name or option is one line naming what is registered; a registered name is a plain string the schema does not
close, while the closed choices are typed and refused at compose."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conftest import compose_cfg
from mtrain.job import Job
from mtrain.registry import Registry
from mtrain.rl import ADVANTAGES, POLICY_LOSSES, group_advantages, policy_loss, register_advantage, register_policy_loss
from mtrain.rl.losses import clipped_surrogate
from test_grpo import SIGNAL, TINY, grpo, history

SEEN: dict[str, list] = {"scale": [], "my_option": [], "clip_high": []}


@pytest.fixture
def pieces():
    """Register a test advantage and a test policy loss for one test (and take them away after)."""

    @register_advantage("test_scaled")
    def scaled(rewards, *, scale: float = 1.0):
        """The group-centred reward times ``scale`` (an option only this estimator takes)."""
        SEEN["scale"].append(scale)
        return scale * (rewards - rewards.mean(dim=1, keepdim=True))

    @register_policy_loss("test_ppo_scaled")
    def ppo_scaled(logp, logp_old, adv, mask, *, clip_low, clip_high, agg, my_option: int = 1):
        """PPO's clipped surrogate times ``my_option``; takes the framework's clip range and aggregation."""
        SEEN["my_option"].append(my_option)
        SEEN["clip_high"].append(clip_high)
        log_ratio = torch.where(mask, logp - logp_old, torch.zeros_like(logp))
        loss, stats = clipped_surrogate(log_ratio.exp(), log_ratio, adv, mask, clip_low, clip_high, None, None, agg)
        return my_option * loss, stats

    for v in SEEN.values():
        v.clear()
    yield scaled, ppo_scaled
    ADVANTAGES.unregister("test_scaled")
    POLICY_LOSSES.unregister("test_ppo_scaled")


def test_a_registered_advantage_and_loss_run_end_to_end_with_their_options(tmp_path, pieces):
    """Chosen by name in the config, with their options from task.advantage_args / task.loss_args set like any other
    override (no +): both reach the pieces every step, through the GRPO task's Lightning fit."""
    m, run_dir = grpo(tmp_path, "trainer.max_steps=2", SIGNAL, "task.advantage=test_scaled",
                      "task.advantage_args.scale=3.0", "task.loss=test_ppo_scaled", "task.loss_args.my_option=3",
                      "task.clip_high=0.3")
    assert m["steps"] == 2 and math.isfinite(float(history(run_dir)[-1]["train/loss"]))
    assert SEEN["scale"] == [3.0, 3.0]  # one advantage computation per RL step
    assert SEEN["my_option"] and set(SEEN["my_option"]) == {3}  # every mini-batch loss
    assert set(SEEN["clip_high"]) == {0.3}  # the framework's settings reach it by name


def test_an_option_reaches_the_piece_and_changes_its_numbers(pieces):
    scaled, _ = pieces
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    base = group_advantages(rewards, "test_scaled")
    assert torch.equal(group_advantages(rewards, "test_scaled", options={"scale": 3.0}), 3 * base)
    logp = torch.log(torch.tensor([[1.1, 0.9]]))
    one, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), kind="test_ppo_scaled")
    three, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), kind="test_ppo_scaled",
                           options={"my_option": 3})
    assert three.item() == pytest.approx(3 * one.item())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task.advantage=test_scaled", "task.advantage_args.scael=3"],
         "task.advantage_args.scael: advantage mode 'test_scaled' takes no option 'scael'; its options: scale"),
        (["task.advantage_args.scale=3"], "task.advantage_args.scale: advantage mode 'grpo' takes no option 'scale'; "
                                          "its options: none"),
        (["task.advantage=test_scaled", "task.advantage_args.norm_std=false"],
         "task.advantage_args.norm_std: norm_std is set by the framework"),
        (["task.loss=dpo"], "task.loss='dpo': unknown policy loss kind 'dpo'. Fix: use one of ppo, gspo, "
                            "test_ppo_scaled"),
        (["task.loss_agg=sum"], "task.loss_agg='sum': unknown loss_agg mode 'sum'. Fix: use one of token-mean,"),
        (["task.kl_estimator=k4"], "task.kl_estimator='k4': unknown KL estimator 'k4'. Fix: use one of k1, k2, k3"),
        (["task.reward=exactt"], "unknown reward 'exactt'. Fix: use one of exact, numeric"),
        (["task.reward_args.tol=1"], "task.reward_args.tol: reward 'exact' takes no option 'tol'; its options: none"),
        (["task.rollout_correction.mode=icepop"], "CorrectionConfig.mode: unknown mode 'icepop'; expected one of "
                                                  "off, token_tis"),
        (["task.rollout_correction.args.x=1"], "task.rollout_correction.args.x: correction mode 'off' takes no option"),
        (["task.engine=vllm"], "engine='vllm' is not one of auto, recompute, fast, file, or a dotted path"),
        (["task.engine=my_missing_pkg.Engine"], "rollout engine 'my_missing_pkg.Engine': no module named "
                                                "'my_missing_pkg'"),
        (["task.engine_args.graph=false"], "task.engine_args.graph: rollout engine 'fast' takes no option 'graph'; "
                                           "its options: graphs"),
        (["task.engine=recompute", "task.engine_args.exact=true"], "task.engine_args.exact: exact is set by the "
                                                                    "framework"),
    ],
)
def test_a_bad_name_or_option_is_one_line_naming_the_registered_ones(pieces, overrides, message):
    from mtrain.job.run import user_error
    from mtrain.tasks.grpo import check_config

    with pytest.raises(Exception) as e:
        check_config(Job.prepare(compose_cfg([*TINY, *overrides])))
    assert user_error(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_dotted_path_imports_the_module_that_registers_it(tmp_path, monkeypatch):
    (tmp_path / "my_rl_pieces.py").write_text(
        "from mtrain.rl import register_advantage\n\n"
        "@register_advantage('my_rl_pieces.halved')\n"
        "def halved(rewards, *, by: float = 2.0):\n    return rewards / by\n\n"
        "def plain(rewards):\n    return rewards * 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        r = torch.tensor([[2.0, 4.0]])
        assert torch.equal(group_advantages(r, "my_rl_pieces.halved", options={"by": 4.0}), r / 4)
        assert "my_rl_pieces.halved" in ADVANTAGES  # its import registered it
        assert torch.equal(group_advantages(r, "my_rl_pieces.plain"), torch.zeros(1, 2))  # a function as it is
        with pytest.raises(ValueError, match="module 'my_rl_pieces' has no attribute 'nope'"):
            group_advantages(r, "my_rl_pieces.nope")
    finally:
        ADVANTAGES.unregister("my_rl_pieces.halved")


def test_registering_a_name_twice_is_refused_and_the_same_object_is_fine():
    reg = Registry("thing", inputs=0)
    first = reg.register("a")(lambda: 1)
    assert reg.register("a")(first) is first
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(lambda: 2)


def test_closed_choices_fail_at_compose_and_registry_choices_stay_open(pieces):
    """routing_replay is typed: a bad value is refused while composing (what --cfg job does); a registry name is a
    string the schema leaves open, so a name registered at runtime composes and passes the check."""
    with pytest.raises(ConfigCompositionException, match="routing_replay"):
        compose_cfg(["task=grpo", "task.routing_replay=r9"])
    with pytest.raises(ConfigCompositionException, match="old_logprobs"):
        compose_cfg(["task=grpo", "task.rollout_correction.old_logprobs=engine"])
    with pytest.raises(ConfigCompositionException, match="rollout_format"):
        compose_cfg(["task=grpo", "task.rollout_format=sglang2"])
    cfg = compose_cfg([*TINY, "task.advantage=test_scaled", "task.advantage_args.scale=2"])
    assert cfg.task.advantage == "test_scaled" and cfg.task.advantage_args == {"scale": 2}
    from mtrain.tasks.grpo import check_config

    check_config(Job.prepare(cfg))
    with pytest.raises(ConfigCompositionException, match="advantage_argz"):  # only the *_args nodes are open
        compose_cfg(["task=grpo", "task.advantage_argz.scale=2"])


def test_the_config_check_runs_before_lightning_is_imported(tmp_path):
    """A bad registry name of task=grpo is one line and exit 2 from the CLI, before Lightning is imported."""
    from conftest import run_cli
    from test_cli import _MAIN_THEN_LIGHTNING

    r = run_cli(["task=grpo", "task.advantage=ppo2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                entry=("-c", _MAIN_THEN_LIGHTNING))
    assert r.stdout.strip().splitlines()[-1] == "exit 2 False", r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtrain: error: task.advantage='ppo2': unknown advantage mode"), \
        r.stderr


ENGINE_MODULE = """
from mtrain.rl.engines import RecomputeEngine

SEEN = []


class Counting(RecomputeEngine):
    \"\"\"An engine of one's own: the reference engine that counts its requests, with an option of its own.\"\"\"

    def __init__(self, *, copy_of, eos_ids, pad_id, label: str = "none", url: str):
        super().__init__(copy_of=copy_of, eos_ids=eos_ids, pad_id=pad_id)
        SEEN.append(("built", label, type(copy_of).__name__))

    def _generate(self, request):
        SEEN.append(("generate", len(request.prompts)))
        return super()._generate(request)
"""


def test_an_engine_of_ones_own_by_dotted_path_runs_grpo_with_its_options(tmp_path, monkeypatch):
    """``task.engine=package.module.Class`` (what an HTTP engine will be): built with the context keywords it names
    and its own options from ``task.engine_args``; every RL step's rollouts come from it; a misspelt option is one
    line naming its options."""
    import importlib

    (tmp_path / "my_engines.py").write_text(ENGINE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("my_engines")
    m, _ = grpo(tmp_path, "trainer.max_steps=2", SIGNAL, "task.engine=my_engines.Counting",
                "task.engine_args.label=hi", "task.engine_args.url=http://localhost:1")
    assert mod.SEEN[0] == ("built", "hi", "Glm4MoeForCausalLM")  # the trainer to copy
    assert mod.SEEN[1:] == [("generate", 16), ("generate", 16)]  # 4 prompts x 4 responses, each RL step
    assert m["engine"] == "my_engines.Counting" and m["steps"] == 2
    assert m["mismatch_k3_mean"] == 0.0 and m["engine_syncs"] > 1  # the trainer's own numbers; weights handed over

    from mtrain.job.run import user_error
    from mtrain.tasks.grpo import check_config

    with pytest.raises(Exception) as e:
        check_config(Job.prepare(compose_cfg([*TINY, "task.engine=my_engines.Counting", "task.engine_args.lable=x"])))
    assert user_error(e.value) and "task.engine_args.lable: rollout engine 'my_engines.Counting' takes no option " \
        "'lable'; its options: label, url" in str(e.value)
    with pytest.raises(Exception) as e:  # a required option left out: before anything is built, not a TypeError
        check_config(Job.prepare(compose_cfg([*TINY, "task.engine=my_engines.Counting"])))
    assert user_error(e.value) and "task.engine_args.url: rollout engine 'my_engines.Counting' needs it" \
        in str(e.value), str(e.value)
