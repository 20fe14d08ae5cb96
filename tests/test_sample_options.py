"""
The sampling and analysis scripts take their flags from the table's sample and analysis groups
(`config.SAMPLING`): no default of theirs is written in the script, and the original
improved-diffusion flag names stay.
"""

import importlib.util
import os

import pytest

from improved_diffusion.options import config
from tiny import ROOT

# script: the `use` whose defaults it takes (Option.uses)
SCRIPTS = {"image_sample": None, "classifier_sample": None, "super_res_sample": None, "consistency": "consistency",
           "image_nll": "image_nll", "hessian": "hessian", "interpolate": "interpolate"}
# flags of a script from the tools' table: the classifier's (script_util.classifier_defaults, the
# original API)
TOOL_FLAGS = {"classifier_sample": config.TOOLS["classifier"]}


def _parser(script):
    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, "scripts", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_argparser()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_default_comes_from_the_table(script):
    use = SCRIPTS[script]
    for action in _parser(script)._actions:
        if action.dest == "help":
            continue
        if action.dest in config.SAMPLING:
            assert action.default == config.SAMPLING[action.dest].default_for(use), action.dest
        elif action.dest in config.BY_NAME:
            assert action.default == config.BY_NAME[action.dest].default, action.dest
        else:
            assert action.dest in TOOL_FLAGS.get(script, ()), f"{script}: --{action.dest} is not in a table"
            assert action.default == TOOL_FLAGS[script][action.dest].default, action.dest


def test_the_original_sampling_flags_keep_their_names_and_defaults():
    defaults = {a.dest: a.default for a in _parser("image_sample")._actions}
    assert {k: defaults[k] for k in ("model_path", "num_samples", "batch_size", "use_ddim", "clip_denoised",
                                     "timestep_respacing")} == {
        "model_path": "", "num_samples": 10000, "batch_size": 16, "use_ddim": False, "clip_denoised": True,
        "timestep_respacing": ""}
    # a sampling batch is not a training batch: the same flag, another option, another default
    assert config.BY_NAME["batch_size"].default == 1
    assert {a.dest: a.default for a in _parser("image_nll")._actions}["batch_size"] == 1
    assert {a.dest: a.default for a in _parser("interpolate")._actions}["batch_size"] == 64
    assert {a.dest: a.default for a in _parser("consistency")._actions}["num_samples"] == 32
