"""Sphinx extension of the flash docs: pages computed by the project's own code at build time.

Directives:

``flash-worked-example``
    runs :func:`flash.reference.tiled.forward` on the seeds' 4x2 example with an observer and
    renders the running max, normaliser and output after every tile.
``flash-mask``
    which keys each query row sees, from :func:`flash.masking.visible_key_range`.
``flash-tiling-figure``
    a matplotlib picture of the tiles of a score matrix, classified by
    :func:`flash.masking.classify_tile`.
``flash-backend-support``
    what every installed backend supports, from its declarations (``flash.support.reasons``).
``flash-installed-backends``
    the backends the docs were built with (``flash.backends()``).
``flash-heuristics-table`` / ``flash-smem-table``
    the per-GPU configuration table and the shared-memory budget arithmetic.
``flash-benchmarks``
    plots of ``docs/benchmarks/results/*.json``.
``flash-optional-automodule``
    ``automodule`` for a module that may not exist yet (flash.nn, flash.testing).

The changelog pages are generated before reading (``builder-inited``) from ``packages/*/CHANGELOG.md``;
:mod:`flash_docs.docstrings` adjusts how docstrings are read (napoleon, short cross-references).
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx

from flash_docs import (
    benchmarks,
    changelogs,
    docstrings,
    heuristics_page,
    masks,
    optional_autodoc,
    support,
    worked_example,
)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("flash_bench_results", "benchmarks/results", "env")
    app.add_directive("flash-worked-example", worked_example.WorkedExample)
    app.add_directive("flash-mask", masks.MaskDirective)
    app.add_directive("flash-tiling-figure", masks.TilingFigure)
    app.add_directive("flash-backend-support", support.BackendSupport)
    app.add_directive("flash-installed-backends", support.InstalledBackends)
    app.add_directive("flash-heuristics-table", heuristics_page.HeuristicsTable)
    app.add_directive("flash-smem-table", heuristics_page.SmemTable)
    app.add_directive("flash-benchmarks", benchmarks.Benchmarks)
    app.add_directive("flash-optional-automodule", optional_autodoc.OptionalAutomodule)
    app.connect("builder-inited", changelogs.generate)
    app.setup_extension("sphinx.ext.napoleon")
    docstrings.take_over_napoleon(app)
    app.connect("missing-reference", docstrings.resolve_by_suffix)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
