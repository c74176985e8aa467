"""MkDocs hook (``hooks:`` in mkdocs.yml): generated tables on the method pages.

A method page says ``<!-- options: maml; omniglot 5w1s; omniglot 20w1s; sinusoid -->`` and gets,
in its place, a table of the method's options: flag, help, the ``Config()`` default and the value
each named setting resolves to (``resolve_config``, i.e. the paper's defaults for that task, what
``metalearn train ... --print-config`` prints), plus the main training options. Generated when
the site is built, so the page cannot disagree with the code.

A setting is a dataset name followed by any of: a split name (``vinyals``, ``maml``, ``lake``),
``NwKs`` (N ways, K shots), ``test:NwKs`` (the test episodes' shape).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MARKER = re.compile(r"<!--\s*options:\s*(.*?)\s*-->")
TRAIN_ROWS = ("steps", "meta_batch_size", "meta_lr", "meta_optimizer", "lr_halve_every", "lr_anneal",
              "eval_episodes")
SHAPE = re.compile(r"^(test:)?(\d+)w(\d+)s$")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return MARKER.sub(lambda match: options_table(*[part.strip() for part in match.group(1).split(";")]), markdown)


def task_of(setting: str) -> dict[str, Any]:
    dataset, *words = setting.split()
    task: dict[str, Any] = {"dataset": dataset}
    for word in words:
        shape = SHAPE.match(word)
        if shape:
            prefix = "test_" if shape.group(1) else ""
            task[prefix + "ways"], task[prefix + "shots"] = int(shape.group(2)), int(shape.group(3))
        else:
            task["split"] = word
    return task


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value in ("", None):
        return "-"
    return f"`{value}`"


def options_table(method: str, *settings: str) -> str:
    from metalearn import resolve_config
    from metalearn.config import TrainConfig
    from metalearn.options import help_of

    from metalearn.algorithms import method_class
    from metalearn.errors import flag

    cls = method_class(method)
    resolved = []
    for setting in settings:
        data = resolve_config(method, task=task_of(setting)).to_dict()
        resolved.append((data["method_config"], data["train"]))
    header = "| option | meaning | `Config()` default | " + " | ".join(f"{s}" for s in settings) + " |"
    lines = [header, "|" + " --- |" * (3 + len(settings))]
    for field in dataclasses.fields(cls.Config):
        text = help_of(field).replace("|", "\\|")
        values = " | ".join(_cell(options.get(field.name)) for options, _ in resolved)
        lines.append(f"| `{flag(field.name)}` | {text} | {_cell(field.default)} | {values} |")
    train_fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    for name in TRAIN_ROWS:
        field = train_fields[name]
        text = help_of(field).replace("|", "\\|")
        values = " | ".join(_cell(train[name]) for _, train in resolved)
        lines.append(f"| `{flag(name)}` (training) | {text} | {_cell(field.default)} | {values} |")
    return "\n".join(lines) + "\n"


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """The CLI reference's "Default" cells: an option without a default of its own (click's
    UNSET, or None where the paper's value for the task applies) reads "-"."""
    if page.file.src_uri != "cli.md":
        return html
    return html.replace("<td><code>Sentinel.UNSET</code></td>", "<td>-</td>").replace("<td>None</td>", "<td>-</td>")
