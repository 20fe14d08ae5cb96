"""
The options table (improved_diffusion/options/config.py): every training option is defined once,
and --help, config.json, --config files and the original API are all derived from it.
"""

import ast
import glob
import importlib.util
import json
import os
import re

import pytest

from improved_diffusion.options import config
from improved_diffusion.script_util import model_and_diffusion_defaults
from tiny import ROOT, TINY_MODEL, flags, make_npz, run_script

# Where the defaults passed in come from the caller: the original API's helper.
DEFAULT_TAKERS = ("add_dict_to_argparser",)


def help_flags(script):
    text = run_script(script, ["--help"]).stdout
    return set(re.findall(r"^\s+--([a-z0-9_]+)", text, flags=re.M))


def test_every_help_option_reaches_config_json_and_back(tmp_path):
    """--help lists exactly the table; a run's config.json holds every option but the run
    group; fed back as --config it reproduces the same options (and nothing else)."""
    assert help_flags("image_train.py") == set(config.names())
    data = make_npz(tmp_path / "train.npz", n=8)
    opts = dict(TINY_MODEL, data_dir=data, log_dir=tmp_path / "a", batch_size=2, total_steps=1, lr=3e-4,
                schedule_sampler="clts", clts_mu=0.2, momentum_decay=True, channels_last=True)
    run_script("image_train.py", flags(opts))
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert set(saved) == set(config.names()) - set(config.names("run"))
    assert saved["clts_mu"] == 0.2 and saved["lr"] == 3e-4 and saved["channels_last"] is True
    proc = run_script("image_train.py", ["--config", tmp_path / "a" / "config.json", "--dry_run", "True",
                                         "--log_dir", tmp_path / "b"])
    printed = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0]
    assert printed == saved


def test_model_and_diffusion_defaults_are_the_tables_model_groups():
    defaults = model_and_diffusion_defaults()
    assert defaults == config.defaults("model", "diffusion")
    assert list(defaults)[:3] == ["image_size", "num_channels", "num_res_blocks"]  # the original's order


def test_base_overlays_and_their_errors(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"lr": 0.1, "batch_size": 4}))
    (tmp_path / "v.json").write_text(json.dumps({"base": "base.json", "lr": 0.2}))
    assert config.read_options_file(tmp_path / "v.json") == {"lr": 0.2, "batch_size": 4}
    (tmp_path / "loop.json").write_text(json.dumps({"base": "loop.json"}))
    with pytest.raises(ValueError, match="comes back"):
        config.read_options_file(tmp_path / "loop.json")
    (tmp_path / "bad.json").write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(ValueError, match="lr must be a float"):
        config.load_config(tmp_path / "bad.json", config.BY_NAME)


def test_layers_run_config_then_config_file_then_flags(tmp_path):
    """table < the checkpoint's config.json (model groups) < --config < command line."""
    import argparse

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"image_size": 16, "num_channels": 48, "lr": 9.0}))
    (run / "model000001.pt").write_bytes(b"")
    (tmp_path / "c.json").write_text(json.dumps({"num_channels": 40, "lr": 0.5}))
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_path", default="")
    config.add_options(parser, config.names("model", "diffusion") + ["config"])
    args, run_config = config.parse(parser, ["--model_path", str(run / "model000001.pt")], "model_path")
    assert (args.image_size, args.num_channels) == (16, 48) and run_config["lr"] == 9.0
    argv = ["--model_path", str(run / "model000001.pt"), "--config", str(tmp_path / "c.json")]
    args, _ = config.parse(parser, argv, "model_path")
    assert (args.image_size, args.num_channels) == (16, 40)  # lr is not this parser's: ignored
    args, _ = config.parse(parser, argv + ["--num_channels", "24"], "model_path")
    assert args.num_channels == 24


@pytest.mark.parametrize("flag, value, message", [
    ("lr", "-1", "--lr must be positive"),
    ("noise_schedule", "cubic", "invalid choice"),
    ("clts_mu", "2", "clts_mu must lie in [0, 1]"),
    ("schedule_sampler", "foo", "invalid choice"),
])
def test_bad_values_fail_before_any_work(tmp_path, flag, value, message):
    """Refused with the flag's name, before the data is read (the data path does not exist)."""
    proc = run_script("image_train.py", ["--data_dir", tmp_path / "missing.npz", "--log_dir", tmp_path / "x",
                                         f"--{flag}", value, "--schedule_sampler", "clts"] if flag != "schedule_sampler"
                      else ["--data_dir", tmp_path / "missing.npz", "--log_dir", tmp_path / "x", f"--{flag}", value],
                      check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "missing.npz" not in proc.stderr


def _writes_values(node):
    """A dict written out with values: `{"lr": 1e-4, ...}` or `dict(lr=1e-4, ...)`."""
    if isinstance(node, ast.Dict):
        return any(key is not None for key in node.keys)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return any(k.arg for k in node.keywords)
    return False


def written_defaults(path):
    """Lines of `path` that write a flag's default: `add_argument(..., default=...)` (also through
    an alias such as `add = parser.add_argument`), or `add_dict_to_argparser` given a dict
    written out (directly or through a name assigned one)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    assigned, adders = {}, {"add_argument"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned[target.id] = node.value
                    if isinstance(node.value, ast.Attribute) and node.value.attr == "add_argument":
                        adders.add(target.id)
    exempt = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in DEFAULT_TAKERS
              for n in ast.walk(f)}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in exempt:
            continue
        callee = getattr(node.func, "attr", getattr(node.func, "id", ""))
        if callee in adders and any(k.arg == "default" for k in node.keywords):
            lines.append(node.lineno)
        if callee == "add_dict_to_argparser" and len(node.args) > 1:
            given = node.args[1]
            if isinstance(given, ast.Name):
                given = assigned.get(given.id, given)
            if _writes_values(given):
                lines.append(node.lineno)
    return sorted(lines)


def test_no_option_default_is_written_outside_the_tables():
    """Every flag default of the scripts and the package is a table's (config.OPTIONS, SAMPLING,
    TOOL_OPTIONS): none is written in an add_argument call or a dict of flags."""
    paths = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py"))
                   + glob.glob(os.path.join(ROOT, "scripts", "launch", "*.py"))
                   + glob.glob(os.path.join(ROOT, "improved_diffusion", "**", "*.py"), recursive=True))
    found = [f"{os.path.relpath(p, ROOT)}:{line}" for p in paths for line in written_defaults(p)]
    assert not found, ("defaults written outside the tables (improved_diffusion/options/config.py):\n"
                       + "\n".join(found))


def test_tool_options_repeat_the_codes_values():
    """Where a tool option's default or help text repeats a value of the code, they agree."""
    from improved_diffusion.evaluation import metrics
    from improved_diffusion.experiments.study import SWEEPS
    from improved_diffusion.script_util import NUM_CLASSES

    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "scripts", "benchmark.py"))
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    tools = config.TOOLS
    assert f"(0: {benchmark.DENSE_BF16_PEAK_TFLOPS:g} on CUDA" in tools["benchmark"]["peak_tflops"].help
    assert tools["benchmark_metrics"]["block_size"].default == metrics.DEFAULT_BLOCK_SIZE
    assert f"among {', '.join(metrics.METRICS)} " in tools["fid"]["metrics"].help
    assert tools["study"]["sweeps"].help.endswith(", ".join(s[0] for s in SWEEPS))
    assert tools["classifier"]["classifier_num_classes"].default == NUM_CLASSES
