"""
`run_dir.load_run`: a checkpoint file or a run folder to model, diffusion and options, the
one loader of the sampling, evaluation and analysis scripts and of the study.
"""

import json

import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run.run_dir import load_run
from improved_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from tiny import TINY_MODEL

RATES = (0.9, 0.99)


def _weights(seed):
    torch.manual_seed(seed)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY_MODEL})
    return model.state_dict()


@pytest.fixture
def run(tmp_path):
    """A run folder as a trainer leaves it: config.json and the checkpoints of steps 2 and 4,
    each file with other weights (seed 10 * step + k)."""
    folder = tmp_path / "run"
    for step in (2, 4):
        files = {ckpt.model_name(step): _weights(10 * step)}
        for k, rate in enumerate(RATES, 1):
            files[ckpt.ema_name(rate, step)] = _weights(10 * step + k)
        ckpt.write_checkpoint(str(folder), step, files, {"ema_rate": list(RATES)})
    (folder / "config.json").write_text(json.dumps({**TINY_MODEL, "ema_rate": "0.9,0.99", "lr": 1e-3}))
    return folder


def _same(model, seed):
    expected = _weights(seed)
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_run_folder_gives_its_newest_first_ema_with_the_runs_options(run):
    loaded = load_run(run)
    assert (loaded.step, loaded.path) == (4, str(run / ckpt.ema_name(0.9, 4)))
    assert _same(loaded.model, 41) and not loaded.model.training
    assert {k: loaded.options[k] for k in TINY_MODEL} == TINY_MODEL
    assert loaded.diffusion.num_timesteps == TINY_MODEL["diffusion_steps"]
    assert loaded.run_config["lr"] == 1e-3


def test_model_rate_and_step_pick_the_file(run):
    assert _same(load_run(run, which="model").model, 40)
    assert _same(load_run(run, rate="0.99").model, 42)
    assert _same(load_run(run, step=2, rate=0.99).model, 22)
    with pytest.raises(FileNotFoundError, match="no EMA of rate 0.5"):
        load_run(run, rate=0.5)
    with pytest.raises(FileNotFoundError, match="checkpoint 000003"):
        load_run(run, step=3)


def test_a_checkpoint_file_reads_the_config_beside_it_and_overrides_win(run):
    loaded = load_run(run / ckpt.model_name(2), overrides={"timestep_respacing": "10"})
    assert loaded.step == 2 and _same(loaded.model, 20)
    assert loaded.diffusion.num_timesteps == 10 and loaded.options["timestep_respacing"] == "10"


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_older_one(run):
    path = run / ckpt.ema_name(0.9, 4)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 300] ^= 0x10
    path.write_bytes(bytes(raw))
    said = []
    loaded = load_run(run, log=said.append)
    assert loaded.step == 2 and _same(loaded.model, 21)
    assert len(said) == 1 and "checkpoint 000004 is damaged" in said[0]


def test_a_folder_without_a_checkpoint_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no intact checkpoint"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.pt: no such checkpoint file"):
        load_run(tmp_path / "nothing.pt")


def test_weights_of_another_model_name_the_flags(run):
    with pytest.raises(ValueError, match="num_channels"):
        load_run(run, overrides={"num_channels": 16})
