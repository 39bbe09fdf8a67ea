"""The report's options (the keywords of ``write_report``) and their ``--set KEY=VALUE`` parsing:
light, so the command line can show the defaults without loading the report."""

from __future__ import annotations

import tomllib

# The report's options and their defaults: the keywords of write_report, and what --set KEY=VALUE may change.
OPTIONS = {"title": "mutransfer report", "max_trial_rows": 10}


class OptionError(ValueError):
    """A --set that names no report option or gives it a value of the wrong kind."""


def parse_options(assignments: list[str], options: dict | None = None) -> dict:
    """``KEY=VALUE`` assignments (values as TOML; a bare word is a string) over the options; raises
    OptionError naming the key and the allowed ones."""
    options = dict(options or OPTIONS)
    allowed = ", ".join(OPTIONS)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise OptionError(f"--set {assignment!r}: expected KEY=VALUE, e.g. title=\"Width sweep\"; "
                              f"keys: {allowed}")
        if key not in OPTIONS:
            raise OptionError(f"--set {key}: unknown report option {key!r}; allowed: {allowed}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if isinstance(OPTIONS[key], str):
            value = value if isinstance(value, str) else text.strip()
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"--set {key}={text}: expected a positive whole number")
        options[key] = value
    return options
