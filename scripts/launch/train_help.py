"""
docs/train-help.txt from the option table (improved_diffusion/options/config.py), so the two cannot drift
(tests/test_launch.py checks that the file is up to date):

    python scripts/launch/train_help.py            # print it
    python scripts/launch/train_help.py --write    # rewrite docs/train-help.txt
    python scripts/launch/train_help.py --check    # exit 1 when docs/train-help.txt is out of date
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
PATH = os.path.join(ROOT, "docs", "train-help.txt")

HEADER = """\
Options of scripts/image_train.py by group, as --name (default): help. Command-line flags
override a --config file, which overrides these defaults. `python scripts/image_train.py --help`
prints them too. Generated from improved_diffusion/options/config.py by
`python scripts/launch/train_help.py --write`: do not edit by hand.
"""


def text():
    from improved_diffusion.options import config

    return HEADER + "\n" + config.help_text(config.names()) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if argv == ["--write"]:
        with open(PATH, "w") as f:
            f.write(text())
        return 0
    if argv == ["--check"]:
        with open(PATH) as f:
            if f.read() == text():
                return 0
        print(f"error: {PATH} is out of date: run python scripts/launch/train_help.py --write", file=sys.stderr)
        return 1
    if argv:
        print(f"error: unknown arguments {' '.join(argv)}\n{__doc__.strip()}", file=sys.stderr)
        return 2
    sys.stdout.write(text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
