"""
Check image_train.py flags without training, for the launch scripts.

    python scripts/launch/train_flags.py [--sweep KEY=V1,V2,...] [--] [FLAG VALUE ...]

Exits 0 when every FLAG is an option of `scripts/image_train.py` (the table of
`improved_diffusion/options/config.py`) with a value of the right type and range, and when KEY names
such an option exactly and each of its values passes. Otherwise it prints what is wrong, with
the closest option names, and exits 2:

    $ python scripts/launch/train_flags.py --sweep clts_muu=0.1,0.3
    error: --sweep clts_muu: no such image_train.py option (did you mean clts_mu?)

`--config`, `--data_dir` and `--log_dir` are refused: the launch scripts set them per run.
"""

import argparse
import difflib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Set by the launch scripts for every run (config file, DATA_DIR, OUT_DIR/NAME).
RESERVED = ("config", "data_dir", "log_dir")


class FlagError(Exception):
    pass


def option_names():
    """Every option name of image_train.py (without the leading --), sorted."""
    from improved_diffusion.options import config

    return sorted(config.names())


def _parser():
    """image_train.py's flags as argparse reads them (types, choices, unique prefixes), from the table."""
    from improved_diffusion.options import config

    parser = argparse.ArgumentParser(prog="image_train.py")
    config.add_options(parser, config.names())

    def error(message):
        raise FlagError(message)

    parser.error = error
    return parser


def suggestions(name, names, n=4):
    """Option names close to `name`: spelling neighbours first, then names containing it."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if len(name) >= 2:
        close += [x for x in names if name in x and x not in close]
    return close[:n]


def unknown_message(what, name, names):
    close = suggestions(name, names)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{what}: no such image_train.py option{hint}; `python scripts/image_train.py --help` lists them"


def check_name(name, names, what, exact=False):
    """The option `name` stands for (argparse also takes a unique prefix unless `exact`)."""
    if name in RESERVED:
        raise FlagError(f"{what}: set by the launch scripts for every run; do not pass it")
    if name in names:
        return name
    matches = [] if exact else [x for x in names if x.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    raise FlagError(unknown_message(what, name, names))


def flag_names(words):
    """The option names of the `--name` / `--name=value` words in `words`."""
    return [w[2:].split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def check(flags, sweep=None):
    """
    Check `flags` (a list of command-line words) and, if given, `sweep` = (key, [values]).

    :return: the sweep key's option name, or None.
    :raises FlagError: naming the bad flag or value.
    """
    from improved_diffusion.options import config

    names = option_names()
    given = [check_name(n, names, f"--{n}") for n in flag_names(flags)]
    key = None
    runs = [[]]
    if sweep is not None:
        key, values = sweep
        key = check_name(key, names, f"--sweep {key}", exact=True)
        if key in given:
            raise FlagError(f"--sweep {key}: --{key} is also among the extra flags, which would override "
                            "the swept value in every run")
        given.append(key)
        runs = [[f"--{key}", v] for v in values]

    parser = _parser()
    for run in runs:
        try:
            args = vars(parser.parse_args(list(flags) + run))
            config.validate({n: args[n] for n in given})  # each option's own range check
        except (FlagError, ValueError) as e:
            where = f"--sweep {key}={run[1]}: " if run else ""
            raise FlagError(where + str(e)) from None
    return key


def parse_sweep(text):
    if "=" not in text:
        raise FlagError(f"--sweep must be KEY=V1,V2,... (e.g. clts_mu=0.1,0.3,0.5), got '{text}'")
    key, values = text.split("=", 1)
    return key, [v for v in values.split(",") if v]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    sweep = None
    try:
        if argv[:1] == ["--sweep"]:
            if len(argv) < 2:
                raise FlagError("--sweep needs KEY=V1,V2,...")
            sweep = parse_sweep(argv[1])
            argv = argv[2:]
        elif argv and argv[0].startswith("--sweep="):
            sweep = parse_sweep(argv[0][len("--sweep="):])
            argv = argv[1:]
        if argv[:1] == ["--"]:
            argv = argv[1:]
        check(argv, sweep)
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
