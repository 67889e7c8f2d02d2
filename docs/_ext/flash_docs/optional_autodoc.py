"""``automodule`` for modules that are still being written (flash.nn, flash.testing).

When the module imports, this is exactly ``.. automodule::`` with the same options; when it does not,
the page says so instead of failing the build.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import admonition, code, esc


class OptionalAutomodule(SphinxDirective):
    required_arguments = 1
    option_spec: ClassVar[dict] = {
        "members": directives.unchanged,
        "undoc-members": directives.flag,
        "imported-members": directives.flag,
        "show-inheritance": directives.flag,
        "no-index": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()
        name = self.arguments[0]
        try:
            importlib.import_module(name)
        except ImportError as error:
            return self.parse_text_to_nodes(
                admonition(
                    "note",
                    (
                        f"{code(name)} is not part of the flash-core these docs were built with "
                        f"(``import {name}`` failed: {esc(error)}). Its reference appears here once it ships."
                    ),
                )
            )
        lines = [f".. automodule:: {name}"]
        for key, value in self.options.items():
            lines.append(f"   :{key}:" + (f" {value}" if value else ""))
        return self.parse_text_to_nodes("\n".join(lines) + "\n")
