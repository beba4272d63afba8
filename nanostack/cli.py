"""Command lines generated from config dataclasses.

Every script's flags are the fields of its `@dataclass` configs: the flag name is the field name with
dashes, the default is the field's default, and the help text is the `# comment` written after the field in
the source. So the flags, their defaults and `--help` can never drift from the code that uses them.
"""
import argparse
import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing


def field_comments(cls) -> dict[str, str]:
    """Map each field of a dataclass to the trailing `# comment` on its line in the source (may be empty)."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    names = {f.name for f in dataclasses.fields(cls)}
    line_field: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in names and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            comments[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return comments


def _flag_type(annotation):
    """The argparse `type` for a field annotation such as `int`, `float | None` or `str`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # dataclasses from `from __future__ import annotations`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


FLAG_NOTE = """Every flag takes one value (--steps 100); true/false flags also take yes/no/1/0, and a bare flag
means true (--resume). Each group above is one config dataclass in the source, and each help line is the
comment beside its field there."""


def make_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A script's parser: its module docstring as the description (examples and layout kept), a one-line usage
    instead of every flag, and a closing note on how flags are written."""
    return argparse.ArgumentParser(prog=prog, description=description, usage="%(prog)s [--flag VALUE ...]",
                                   epilog=FLAG_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str | None = None,
                       defaults_to_none: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of `cls` to `parser`, in a group titled `title`.

    With `defaults_to_none`, unset flags parse as None so the caller can tell "not given" from "given the
    default" (used where other settings derive the value, e.g. the model's width from `--depth`).
    """
    group = parser.add_argument_group(title or cls.__name__)
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _flag_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = comments.get(field.name, "")
        shown = "derived" if defaults_to_none else repr(default)
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_parse_bool if kind is bool else kind,
            default=None if defaults_to_none else default,
            metavar=kind.__name__.upper() if kind is not bool else "BOOL",
            help=f"{help_text} (default: {shown})" if help_text else f"(default: {shown})",
            # A bare `--compile` means true, as a newcomer would expect; `--compile false` still works.
            **({"nargs": "?", "const": True} if kind is bool else {}),
        )


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed flags that belong to it (fields left None keep their defaults)."""
    values = {}
    for field in dataclasses.fields(cls):
        value = overrides.get(field.name, getattr(args, field.name, None))
        if value is not None:
            values[field.name] = value
    return cls(**values)


def given_fields(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` that were given on the command line (parsed with `defaults_to_none`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


class SettingsError(ValueError):
    """Bad settings that every rank of a torchrun job finds alike (the mesh, the model's split): rank 0 reports."""


def run(main) -> None:
    """Run a script's `main()` and exit with its code; bad input (a ValueError, CheckpointError included)
    becomes one `error: ...` line on stderr and exit status 1 instead of a traceback. A SettingsError under
    torchrun exits every rank with status 1, and rank 0 alone prints the line."""
    try:
        sys.exit(main())
    except ValueError as error:
        quiet = isinstance(error, SettingsError) and os.environ.get("RANK", "0") != "0"
        sys.exit(1 if quiet else f"error: {error}")
