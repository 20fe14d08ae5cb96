"""
The registry of methods (improved_diffusion/methods/): every registered method reaches the
options table, --help, the factories, the study and the launch scripts by itself, and its
constructor defaults are the table's.
"""

import copy
import importlib.util
import inspect
import os
import pickle

import pytest
import torch

from improved_diffusion.options import config
from improved_diffusion import methods
from improved_diffusion.methods import registry
from improved_diffusion.options.option import Option
from improved_diffusion.resample import ScheduleSampler, UniformSampler, create_named_schedule_sampler
from improved_diffusion.script_util import create_gaussian_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(*path):
    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(ROOT, *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_option_is_in_the_table_once():
    table = [o.name for o in config.OPTIONS]
    for m in methods.methods():
        for o in m.options.values():
            assert table.count(o.name) == 1 and config.BY_NAME[o.name] is o, o.name
            assert o.group == "methods"
    assert config.BY_NAME["schedule_sampler"].choices == methods.sampler_names()
    assert config.BY_NAME["schedule_sampler"].default == "uniform"


@pytest.mark.parametrize("method", methods.methods(), ids=lambda m: m.name)
def test_builder_defaults_are_the_tables(method):
    params = inspect.signature(method.build).parameters
    for keyword, o in method.options.items():
        default = params[keyword].default
        assert default is inspect.Parameter.empty or default == o.default, (method.name, keyword)


@pytest.mark.parametrize("name", methods.sampler_names())
def test_factory_resolves_every_registered_sampler(name):
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    sampler = create_named_schedule_sampler(name, diffusion)
    assert isinstance(sampler, ScheduleSampler)
    t, w = sampler.sample(5, "cpu")
    assert t.shape == w.shape == (5,)
    sampler.update_with_local_losses(t, torch.ones(5))  # every sampler has it; only loss-aware ones learn


def test_base_sampler_ignores_losses():
    sampler = UniformSampler(create_gaussian_diffusion(steps=10, noise_schedule="cosine"))
    sampler.update_with_local_losses(torch.tensor([1, 2]), torch.tensor([0.5, 0.1]))
    assert sampler.state_dict() == {}


def test_variants_reach_the_study_and_the_launch_scripts():
    study = load_script("scripts", "study.py")
    variants = load_script("scripts", "launch", "variants.py")
    assert study.MAIN_VARIANTS == methods.variants()
    assert methods.variants()[:5] == methods.PAPER_VARIANTS
    demo = variants.variants("demo")
    for m in methods.methods():
        if m.variant:
            path = os.path.join(ROOT, "configs", f"demo_{m.variant}.json")
            assert os.path.isfile(path), f"{m.name} declares variant {m.variant} but {path} is missing"
            assert demo[m.variant] == (path, [])
            values = config.read_options_file(path)
            if m.kind == methods.SAMPLER:
                assert values["schedule_sampler"] == m.name
            else:
                assert m.active(values), f"configs/demo_{m.variant}.json does not switch {m.name} on"


def test_diffusion_with_weightings_pickles_and_copies():
    d = create_gaussian_diffusion(steps=20, noise_schedule="cosine", min_snr_gamma=5.0, p2_gamma=1.0)
    for other in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        t = torch.arange(20)
        assert torch.equal(other.loss_weights(t), d.loss_weights(t))
        assert other.loss_weighting == d.loss_weighting and other.min_snr_gamma == 5.0


def test_loss_weighting_keywords_are_checked():
    with pytest.raises(TypeError, match="min_snr_gama"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", min_snr_gama=5.0)
    with pytest.raises(TypeError, match="not both"):
        create_gaussian_diffusion(steps=10, noise_schedule="cosine", loss_weighting=methods.loss_weighting({}), p2_gamma=1.0)


def test_registry_refuses_a_name_or_option_declared_twice():
    uniform = methods.get(methods.SAMPLER, "uniform")
    with pytest.raises(ValueError, match="method declared twice: .*uniform"):
        registry._check_unique([uniform, uniform])
    option = Option("opt_x", 1.0, "x", "methods")
    a = registry.Method("a", methods.SAMPLER, UniformSampler, options={"x": option})
    b = registry.Method("b", methods.SAMPLER, UniformSampler, options={"y": option})
    with pytest.raises(ValueError, match="option declared twice: opt_x"):
        registry._check_unique([a, b])
    with pytest.raises(ValueError, match="group 'methods'"):
        registry.Method("c", methods.SAMPLER, UniformSampler, options={"x": Option("c_x", 1.0, "x", "train")})
    with pytest.raises(ValueError, match="unknown timestep sampler 'nope'"):
        methods.get(methods.SAMPLER, "nope")
