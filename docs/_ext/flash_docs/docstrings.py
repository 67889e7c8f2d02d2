"""How the API reference reads flash's docstrings.

* Napoleon (Google-style ``Args:``/``Returns:`` sections) runs on functions, classes and modules
  only. On attributes it would read a ``#:`` comment such as ``Variable-length batch: (len_q,
  len_k) ...`` as "type: description" and turn the words before the colon into a broken type.
* A cross-reference in a docstring that names an object by a shorter path than its documented
  one (``BackendError`` for ``flash.errors.BackendError``, ``AttentionSpec.features`` from
  another module) is resolved when exactly one documented object ends with that path.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext import napoleon
from sphinx.util.nodes import make_refnode

_SKIP_NAPOLEON = {"attribute", "property", "data"}
_ABSOLUTE = re.compile(r"(?<![\\\w`|])\|([^|\s][^|\n]*?[^|\s]|[^|\s])\|(?![\w|])")


def process_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Napoleon, except on attributes; then ``|a - b|`` (an absolute value, not a substitution) as literal."""
    if what not in _SKIP_NAPOLEON:
        napoleon._process_docstring(app, what, name, obj, options, lines)
    for index, line in enumerate(lines):
        if "|" in line and not line.lstrip().startswith(("|", "+")):  # leave line blocks and grid tables alone
            lines[index] = _ABSOLUTE.sub(lambda m: f"``|{m.group(1)}|``", line)


def take_over_napoleon(app: Sphinx) -> None:
    """Replace napoleon's docstring handler by :func:`process_docstring` (napoleon must be loaded first)."""
    listeners = app.events.listeners.get("autodoc-process-docstring", [])
    for listener in list(listeners):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", process_docstring)


def resolve_by_suffix(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    """Resolve a missing ``py`` reference to the one documented object whose name ends with it."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    if not target or target.startswith(("torch", "typing", "collections")):
        return None
    domain = env.get_domain("py")
    suffix = "." + target
    matches = {name: obj for name, obj in domain.objects.items() if name.endswith(suffix) and not obj.aliased}
    if len(matches) != 1:
        return None
    ((name, obj),) = matches.items()
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)
