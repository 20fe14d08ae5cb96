"""
The variants of an experiment, for the launch scripts: their names come from the registry of
methods (improved_diffusion/methods/: the paper's five, then one per rival method that declares
one), their settings from the overlay config files.

    python scripts/launch/variants.py EXPERIMENT [VARIANT,VARIANT,...]
    # baseline<TAB>/repo/configs/cifar10_baseline.json<TAB>
    # md<TAB>/repo/configs/cifar10_md.json<TAB>
    # ...

prints one line per variant (the paper's five by default, or those named: rivals such as p2
or speed only when named): its name, the --config file that
trains it, and flags to add to that file (space-separated; usually none).

- EXPERIMENT a name (cifar10, imagenet128, demo): its variants are the registered variants
  with a file `configs/EXPERIMENT_VARIANT.json` (an overlay of a base config: `{"base": ..., ...}`).
- EXPERIMENT a config file of one's own (or a name with only `configs/EXPERIMENT.json`): its
  variants are the demo's (`configs/demo_VARIANT.json`, which set every method switch
  explicitly, so they also hold on a base with methods on), given as flags on top of that file.

Unknown experiments and variants are an `error:` line (with the choices) and exit status 2.
"""

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from improved_diffusion import methods  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
# The variants that work as flags on any base config.
GENERIC = "demo"


class VariantError(Exception):
    pass


def format_value(value):
    """A JSON value as the command line spells it (str2bool reads True/False)."""
    return ("True" if value else "False") if isinstance(value, bool) else str(value)


def variant_files(experiment):
    """{variant: configs/EXPERIMENT_VARIANT.json} of the registered variants that have that file,
    in the registry's order (the paper's five first)."""
    paths = {v: os.path.join(CONFIGS, f"{experiment}_{v}.json") for v in methods.variants()}
    return {v: p for v, p in paths.items() if os.path.isfile(p)}


def experiments():
    """Names with a configs/NAME_baseline.json: the experiments the error messages offer."""
    return sorted(os.path.basename(p)[: -len("_baseline.json")] for p in glob.glob(os.path.join(CONFIGS, "*_baseline.json")))


def own_flags(path):
    """The file's own keys (not its base's) as ['--key', 'value', ...]."""
    with open(path) as f:
        values = json.load(f)
    values.pop("base", None)
    return [w for k, v in values.items() for w in (f"--{k}", format_value(v))]


def variants(experiment):
    """{variant: (config, flags)} of `experiment`, in run order."""
    if experiment.endswith(".json") or os.path.isfile(experiment):
        base = experiment
        if not os.path.isfile(base):
            raise VariantError(f"base config not found: {base}")
    else:
        files = variant_files(experiment)
        if files:
            return {v: (p, []) for v, p in files.items()}
        base = os.path.join(CONFIGS, experiment + ".json")
        if not os.path.isfile(base):
            raise VariantError(f"unknown experiment '{experiment}': no configs/{experiment}_VARIANT.json or "
                               f"configs/{experiment}.json (known: {', '.join(experiments())})")
    return {v: (base, own_flags(p)) for v, p in variant_files(GENERIC).items()}


def select(experiment, names=None):
    """[(variant, config, flags)] of the comma-separated `names` (default: the paper's five;
    the rivals, e.g. demo_p2.json, run when named)."""
    known = variants(experiment)
    paper = [v for v in known if v in methods.PAPER_VARIANTS]
    wanted = [n for n in (names or "").split(",") if n] or paper or list(known)
    for n in wanted:
        if n not in known:
            raise VariantError(f"unknown variant '{n}' (choose from: {', '.join(known)})")
    return [(n,) + known[n] for n in wanted]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print(__doc__.strip(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        rows = select(*argv)
    except VariantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, config, flags in rows:
        print(f"{name}\t{config}\t{' '.join(flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
