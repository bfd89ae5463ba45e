"""
One way to parse flags for every stage.

A script declares its settings as a dataclass at the top (defaults are the documented
defaults), then calls `parse_flags(Config)`. Accepted forms:

    --name=value      --name value      -x value  (short aliases declared per field)

Booleans are parsed strictly: true/false/1/0/yes/no (any case); a bare `--flag` means true.
`argparse type=bool` is deliberately not used: bool("False") is True.
A numeric field may declare its range, checked as the flags are parsed, before any work:
`opt(2, help=..., min=1)`, `opt(-1, help="...; -1 derives it", min=1, sentinel=-1)`,
`opt(1.0, min=0, max=1)`, `opt(1.0, above=0, max=1)` (above/below exclude the bound).
Unknown flags, unparsable values and values out of range raise FlagError naming the flag.
"""

import dataclasses
import sys
import typing
from typing import Any

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class FlagError(ValueError):
    pass


def parse_bool(text: str, name: str = "flag") -> bool:
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise FlagError(f"--{name}: expected a boolean (true/false/1/0), got {text!r}")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric flag accepts: a range (min/max inclusive, above/below exclusive) and
    sentinels outside it, such as -1 for "derive it" or "never", which the flag's help explains."""
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    sentinels: tuple = ()

    def allows(self, value) -> bool:
        if value in self.sentinels:
            return True
        # "not value >= min" rather than "value < min", so that NaN lies outside every range
        return not ((self.min is not None and not value >= self.min) or (self.max is not None and not value <= self.max)
                    or (self.above is not None and not value > self.above)
                    or (self.below is not None and not value < self.below))

    def describe(self) -> str:
        lower = f"[{self.min}" if self.min is not None else f"({self.above}" if self.above is not None else None
        upper = f"{self.max}]" if self.max is not None else f"{self.below})" if self.below is not None else None
        if lower and upper:
            span = f"in {lower}, {upper}"
        elif lower:
            span = (">= " if lower[0] == "[" else "> ") + lower[1:]
        else:
            span = ("<= " if upper[-1] == "]" else "< ") + upper[:-1]
        return " or ".join([repr(s) for s in self.sentinels] + [span])


def _field(alias, default, help, choices, min, max, above, below, sentinel, kwargs):
    bounds = None
    if (min, max, above, below, sentinel) != (None,) * 5:
        sentinels = tuple(sentinel) if isinstance(sentinel, (tuple, list)) else (() if sentinel is None else (sentinel,))
        bounds = Bounds(min, max, above, below, sentinels)
        if default is not dataclasses.MISSING and default is not None and not bounds.allows(default):
            raise ValueError(f"the default {default!r} lies outside its own bounds ({bounds.describe()})")
    meta = {"alias": alias, "help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


def short(alias: str, default: Any = dataclasses.MISSING, help: str = "", choices=None, *, min=None, max=None,
          above=None, below=None, sentinel=None, **kwargs):
    """A dataclass field with a short alias such as `-i`, a help text, optional choices and bounds."""
    return _field(alias, default, help, choices, min, max, above, below, sentinel, kwargs)


def opt(default: Any = dataclasses.MISSING, help: str = "", choices=None, *, min=None, max=None,
        above=None, below=None, sentinel=None, **kwargs):
    """A dataclass field with a help text, optional choices and optional bounds (see the module's opening)."""
    return _field(None, default, help, choices, min, max, above, below, sentinel, kwargs)


def _convert(value: str, typ, name: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null", "") and len(non_none) < len(args):
            return None
        return _convert(value, non_none[0], name)
    if typ is bool:
        return parse_bool(value, name)
    if typ is int:
        try:
            return int(float(value)) if ("e" in value.lower() and "." not in value) else int(value)
        except ValueError:
            raise FlagError(f"--{name}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except ValueError:
            raise FlagError(f"--{name}: expected a number, got {value!r}") from None
    if typ is str:
        return value
    raise FlagError(f"--{name}: unsupported flag type {typ}")


def _resolve_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_flags(cls, argv: list[str] | None = None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    types = _resolve_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata.get("alias"): f.name for f in dataclasses.fields(cls) if f.metadata.get("alias")}
    values: dict[str, Any] = {}

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # torchrun passes `--` before script flags
            i += 1
            continue
        if arg in ("-h", "--help"):
            print(flags_help(cls))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            key = key.replace("-", "_")
        elif arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
            key, eq, val = arg[1:].partition("=")
            if key not in aliases:
                raise FlagError(f"unknown short flag -{key}; valid: {', '.join('-' + a for a in sorted(aliases)) or 'none'}")
            key = aliases[key]
        else:
            raise FlagError(f"unexpected argument {arg!r}: flags look like --name=value")
        if key not in fields:
            raise FlagError(f"unknown flag --{key}; valid flags: {', '.join('--' + k for k in fields)}")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if types[key] is bool and (nxt is None or nxt.startswith("-") or nxt.lower() not in _TRUE | _FALSE):
                val = "true"  # bare boolean flag
            elif nxt is None:
                raise FlagError(f"--{key} needs a value")
            else:
                val = nxt
                i += 1
        value = _convert(val, types[key], key)
        choices = fields[key].metadata.get("choices")
        if choices is not None and value not in choices:
            raise FlagError(f"--{key}: {value!r} is not one of {list(choices)}")
        bounds, help_text = fields[key].metadata.get("bounds"), fields[key].metadata.get("help")
        if bounds is not None and value is not None and not bounds.allows(value):
            raise FlagError(f"--{key}={val} is out of range: allowed {bounds.describe()}"
                            + (f" ({help_text})" if help_text else ""))
        values[key] = value
        i += 1

    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FlagError(f"missing required flags: {', '.join('--' + m for m in missing)}")
    return cls(**values)


def flags_help(cls) -> str:
    lines = [f"{cls.__doc__.strip() if cls.__doc__ else cls.__name__}", "", "flags:"]
    types = _resolve_types(cls)
    for f in dataclasses.fields(cls):
        alias = f.metadata.get("alias")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        tname = getattr(types[f.name], "__name__", str(types[f.name]))
        bounds = f.metadata.get("bounds")
        head = f"  --{f.name}" + (f", -{alias}" if alias else "") + f" ({tname}, default {default!r}"
        head += (f", allowed {bounds.describe()})" if bounds else ")")
        lines.append(head + (f": {f.metadata['help']}" if f.metadata.get("help") else ""))
    return "\n".join(lines)


def flags_dict(config) -> dict:
    """The parsed flags as a plain dict, for config.json and the report."""
    return dataclasses.asdict(config)
