"""
Read a training run's options back, for the launch scripts.

    python scripts/launch/config_flags.py LOG_DIR
    # --attention_resolutions 16,8 --class_cond False --diffusion_steps 1000 ... (one line)

prints the model and diffusion flags (the model and diffusion groups of the option table,
`improved_diffusion/options/config.py`) of the run's `LOG_DIR/config.json` as `--key value` pairs,
shell-quoted, so that

    eval "MODEL_FLAGS=($(python scripts/launch/config_flags.py runs/x))"
    python scripts/image_sample.py --model_path ... "${MODEL_FLAGS[@]}"

builds the same model. A key missing from the file gets its default; an empty value is
printed as '' (keys that are empty by default, like channel_mult, are left out when empty,
so the usual output also works unquoted: `$(config_flags.py LOG_DIR)`). LOG_DIR may also be
a config file (any `--config` JSON, read through its "base" as --config reads it). Other modes:

    config_flags.py LOG_DIR --exclude timestep_respacing   # leave keys out
    config_flags.py LOG_DIR --ema_checkpoint               # newest intact EMA checkpoint (first rate)
    config_flags.py LOG_DIR --with_checkpoint              # --model_path THAT, then the flags
    config_flags.py CONFIG.json --get eval_num_samples     # one value ('' when absent)
"""

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def config_path(path):
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def load_config(path):
    from improved_diffusion.options import config

    path = config_path(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file (is this a training log dir?)")
    try:
        return config.read_options_file(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def format_value(value):
    """A config value as the command line spells it (str2bool reads True/False)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value is None:
        return ""
    return str(value)


def model_flags(values, exclude=()):
    """
    ['--key', 'value', ...] for every model/diffusion key, in sorted order.

    A key whose value is empty and whose default is empty too (`channel_mult`,
    `timestep_respacing`) is left out: it changes nothing, and without empty words the output
    also works word-split, unquoted (`$(config_flags.py LOG_DIR)`), in the usual cases.
    """
    from improved_diffusion.options import config

    defaults = config.defaults(*config.MODEL_GROUPS)
    out = []
    for key in sorted(defaults):
        value = format_value(values.get(key, defaults[key]))
        if key in exclude or (value == "" and format_value(defaults[key]) == ""):
            continue
        out += [f"--{key}", value]
    return out


def ema_checkpoint(log_dir):
    """Path of the first-rate EMA file of the newest intact checkpoint in `log_dir`."""
    from improved_diffusion.run import checkpoint as ckpt
    from improved_diffusion.run.run_dir import RunDir

    found = RunDir(log_dir).latest(verify=False)
    if found is None:
        raise SystemExit(f"error: no intact checkpoint (stateNNNNNN.pt with its files) in {log_dir}")
    step, state = found
    rates = state.get("ema_rate") or []
    names = [n for n in state["files"] if n.startswith("ema_")]
    if rates:
        name = ckpt.ema_name(rates[0], step)
        if name in state["files"]:
            return os.path.join(log_dir, name)
    if names:
        return os.path.join(log_dir, sorted(names)[0])
    raise SystemExit(f"error: the checkpoint at step {step} in {log_dir} has no EMA file")


def main(argv=None):
    from improved_diffusion.options import config

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log_dir", metavar="LOG_DIR", help="training log dir (or a config .json)")
    config.add_options(parser, ["exclude"], table=config.TOOLS["config_flags"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ema_checkpoint", action="store_true",
                      help="print the newest intact EMA checkpoint of LOG_DIR instead")
    mode.add_argument("--with_checkpoint", action="store_true",
                      help="start the line with --model_path and the newest intact EMA checkpoint")
    config.add_options(mode, ["get"], table=config.TOOLS["config_flags"])
    args = parser.parse_args(argv)

    if args.ema_checkpoint:
        if not os.path.isdir(args.log_dir):
            raise SystemExit(f"error: {args.log_dir}: not a directory")
        print(ema_checkpoint(args.log_dir))
        return
    values = load_config(args.log_dir)
    if args.get:
        print(format_value(values.get(args.get)))
        return
    exclude = {k.strip() for k in args.exclude.split(",") if k.strip()}
    words = model_flags(values, exclude)
    if args.with_checkpoint:
        words = ["--model_path", ema_checkpoint(args.log_dir)] + words
    print(" ".join(shlex.quote(x) for x in words))


if __name__ == "__main__":
    main()
