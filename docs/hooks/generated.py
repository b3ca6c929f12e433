"""MkDocs hook: the reference pages' parts that are generated from the code at every build, never copied.

A line ``<!-- generated: NAME -->`` alone in a page is replaced by the markdown of ``GENERATORS[NAME]``:

- ``cli``: every ``tuco-peft`` command, its usage and its flags by group, read from the argparse parser that
  ``tuco_peft.cli.build_parser`` builds (what ``tuco-peft COMMAND --help`` prints);
- ``families``: the decoder families of ``tuco_peft.families`` (``registered_families()``: each family as its
  module registered it, and the ``FamilySpec`` it gives for transformers' default config of that type);
- ``support``: the README's table of families by adapter kinds (``tuco_peft.apps.support``);
- ``error-messages``: every message tuco-peft builds a ``TuCoError``, ``InputError`` or
  ``UnsupportedModelError`` with, read from the source (placeholders shown as …).

An unknown NAME fails the build. Nothing here changes the package; it only reads it.
"""

from __future__ import annotations

import argparse
import ast
import html
import importlib.util
import re
import sys
from collections import defaultdict
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
_USAGE_WIDTH = 78
_ERROR_CLASSES = ("TuCoError", "UnsupportedModelError", "InputError")


def on_page_markdown(markdown: str, page, config, files) -> str:
    def generated(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: no generator named {name!r} (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


# ---------------------------------------------------------------------------------------------- text helpers


def _inline(text: str) -> str:
    """Plain text (argparse help, a message) as inline markdown: HTML and markdown syntax escaped, one line."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#])", r"\\\1", text)


def _rst_literals(text: str) -> str:
    """A docstring's ``literal`` spans as markdown code spans."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(f"{name} is not an importable package: pip install -e . first")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------- CLI reference


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return parser.formatter_class(prog=parser.prog, width=_USAGE_WIDTH)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction):
        return ""
    return f"`{action.default}`"


def _argument_rows(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[str]:
    formatter = _formatter(parser)
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for action in actions:
        invocation = formatter._format_action_invocation(action)
        helped = formatter._expand_help(action) if action.help else ""
        rows.append(f"| `{invocation}` | {_default(action)} | {_inline(helped)} |")
    return rows


def _parser_section(parser: argparse.ArgumentParser, heading: str) -> list[str]:
    lines = [f"```text\n{_usage(parser)}\n```", ""]
    if parser.description:
        lines += [_inline(parser.description), ""]
    for group in parser._action_groups:
        actions = [
            action
            for action in group._group_actions
            if action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)
        ]
        if not actions:
            continue
        lines += [f"{heading} {group.title}", ""]
        if group.description:
            lines += [_inline(group.description), ""]
        lines += [*_argument_rows(parser, actions), ""]
    return lines


def cli_reference() -> str:
    from tuco_peft.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["## `tuco-peft`", "", *_parser_section(parser, "###")]
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#tuco-peft-{name}) | {_inline(summaries.get(name) or '')} |" for name in commands.choices]
    lines.append("")
    for name, command in commands.choices.items():
        lines += [f"## `tuco-peft {name}` {{ #tuco-peft-{name} }}", ""]
        if summaries.get(name) and not command.description:
            lines += [_inline(summaries[name]), ""]
        lines += _parser_section(command, "###")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ model families


_CAPABILITIES = {  # FamilySpec's capability flags, as families.md explains them
    "shared_projections": "shared projections",
    "lean_cache": "lean KV cache",
    "pairable": "paired blocks",
}


def families() -> str:
    from transformers import AutoConfig

    from tuco_peft.families import registered_families

    families = registered_families()
    specs = {family.model_type: family.spec_of(AutoConfig.for_model(family.model_type)) for family in families}
    # a capability every family has is said once; one that some lack gets a column
    shared = [name for name in _CAPABILITIES if all(getattr(spec, name) for spec in specs.values())]
    varying = [name for name in _CAPABILITIES if name not in shared]
    header = ["`config.model_type`", "wiring", "q/k/v projections", "q/k norm", "sliding window from"]
    header += [_CAPABILITIES[name] for name in varying]
    lines = []
    if shared:
        named = [_CAPABILITIES[name] for name in shared]
        listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
        lines += [f"Every family below has {listed}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for family in families:
        model_type, spec = family.model_type, specs[family.model_type]
        wiring = spec.wiring.value.replace("_", "-") + (" (per config)" if family.per_config else "")
        cells = [
            f"[`{model_type}`](#{model_type})",
            wiring,
            spec.qkv_layout.value.replace("_", " "),
            spec.qk_norm.value.replace("_", " "),
            spec.window.value,
        ]
        cells += ["yes" if getattr(spec, name) else "no" for name in varying]
        lines.append("| " + " | ".join(cells) + " |")
        docstring = sys.modules[family.module].__doc__ or ""
        note = _rst_literals(" ".join(docstring.split("\n\n")[0].split()))
        if family.per_config:
            config_class = type(AutoConfig.for_model(model_type)).__name__
            note += f" The spec is chosen per config; the table shows it for transformers' default `{config_class}`."
        notes += [
            f"### `{model_type}` {{ #{model_type} }}",
            "",
            f"{note}",
            "",
            f"Decoder block `{family.layer_class}`; spec in `{family.module}`.",
            "",
        ]
    return "\n".join([*lines, "", *notes])


# ------------------------------------------------------------------------------------------ error messages


def _message(node: ast.AST | None) -> str:
    """The text of a message expression, with what is only known at run time as …."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(value.value if isinstance(value, ast.Constant) else "…" for value in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _message(node.left) + _message(node.right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and isinstance(node.func.value, ast.Constant)
    ):
        return re.sub(r"\{[^{}]*\}", "…", node.func.value.value)
    return "…"


def _error_name(call: ast.Call) -> str | None:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name if name in _ERROR_CLASSES else None


def _module_name(path: Path, package: Path, kernels: Path) -> str:
    if path.is_relative_to(kernels):
        parts = ("tuco_peft", "kernels", *path.relative_to(kernels).with_suffix("").parts)
    else:
        parts = ("tuco_peft", *path.relative_to(package).with_suffix("").parts)
    return ".".join(part for part in parts if part != "__init__")


def error_messages() -> str:
    package, kernels = _package_dir("tuco_peft"), _package_dir("tuco_peft.kernels")
    messages: dict[str, dict[str, list[str]]] = {name: defaultdict(list) for name in _ERROR_CLASSES}
    for path in sorted({*package.rglob("*.py"), *kernels.rglob("*.py")}):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and (name := _error_name(node)) is not None:
                text = " ".join(_message(node.args[0] if node.args else None).split())
                listed = messages[name][_module_name(path, package, kernels)]
                if text and text not in listed:
                    listed.append(text)
    lines = []
    for name in _ERROR_CLASSES:
        total = sum(len(texts) for texts in messages[name].values())
        lines += [f"### `{name}` ({total} messages)", ""]
        for module, texts in sorted(messages[name].items()):
            lines.append(f'??? note "`{module}` ({len(texts)})"')
            lines += [f"    - {_inline(text)}" for text in sorted(texts, key=str.lower)]
            lines.append("")
    return "\n".join(lines)


def support() -> str:
    from tuco_peft.apps.support import support_table

    return support_table()


GENERATORS = {"cli": cli_reference, "families": families, "support": support, "error-messages": error_messages}
