"""
One option of the table (`config.OPTIONS`): its definition, its parsing and its check.

Kept apart from the table so that the modules that declare options of their own (the
training methods, `improved_diffusion/methods/`) can build `Option` entries without importing
the table, which gathers them.
"""

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional


def str2bool(v):
    """A command-line boolean ("true"/"false", "yes"/"no", "1"/"0"); argparse names the flag."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {v!r}")


def positive(v):
    return None if v > 0 else "must be positive"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def open_unit_interval(v):
    return None if 0.0 < v < 1.0 else "must be in (0, 1)"


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    group: str
    choices: tuple = ()
    check: Optional[Callable[[Any], Optional[str]]] = None  # value -> what is wrong, or None
    # False: a flag beyond the originals' that defaults() leaves out, so that
    # model_and_diffusion_defaults() keeps their key set (the scripts' parsers and
    # config.json still have it)
    in_defaults: bool = True
    # Other defaults of one option for some scripts, as ((use, default), ...): e.g. the
    # sampling batch size of consistency.py; `config.add_options(..., use=...)` picks them, so
    # a script's default is still written here, in the table.
    uses: tuple = ()
    # argparse keywords of the flag beyond its default, help and choices, as ((keyword, value),
    # ...): nargs, const, metavar, or the type where the default does not tell it (None, a list)
    argparse_kw: tuple = ()

    def default_for(self, use=None):
        """The default of this option for `use` (a script's name; None: the plain default)."""
        return dict(self.uses).get(use, self.default)

    @property
    def parse(self):
        """The argparse type: `argparse_kw`'s, else from the default (str2bool for booleans)."""
        if "type" in dict(self.argparse_kw):
            return dict(self.argparse_kw)["type"]
        if isinstance(self.default, bool):
            return str2bool
        return type(self.default)

    def validate(self, value):
        """ValueError naming the flag when `value` is not acceptable."""
        if self.choices and value not in self.choices:
            raise ValueError(f"--{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise ValueError(f"--{self.name} {problem}, got {value!r}")
