"""Sphinx configuration of the flash documentation.

Build (from the repository root, with torch, the flash packages and docs/requirements.txt installed)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest

Several pages are computed while the docs build, by the project's own code (docs/_ext/flash_docs):
the worked example of the algorithm page runs ``flash.reference.tiled.forward``, the backend
support table asks each installed backend, the heuristics page reads ``flash.heuristics.table()``,
and the benchmark plots are drawn from ``docs/benchmarks/results/*.json``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

os.environ.setdefault("MPLBACKEND", "Agg")  # plots render without a display

import flash  # noqa: E402  (flash-core must be installed: its entry points register the backends)

# -- Project -----------------------------------------------------------------------------------

project = "flash"
author = "the flash developers"
copyright = "2026, the flash developers"
release = flash.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_copybutton",
    "flash_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "benchmarks/results", "**/README.md"]
templates_path: list[str] = []
language = "en"
today_fmt = "%Y-%m-%d"

# Every cross-reference must resolve; names of other projects (torch...) cannot, without network
# for intersphinx, and are listed here instead.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"torch(\..*)?"),
    (r"py:.*", r"(abc|argparse|typing|collections\.abc|contextlib|enum|importlib\.metadata|pathlib|threading)\..*"),
    (r"py:.*", r"(Tensor|Literal|Iterator|Callable|Any|Path|Layout|Descale|Alibi|Pass|Observer|optional)"),
    (r"py:.*", r"(Sharding|ProcessGroup)"),
    (r"py:.*", r"(Enum|EntryPoint|ContextVar|RLock|NoneType|ellipsis)"),
    (r"py:.*", r"(ABC|Exception|ValueError|RuntimeError)"),
    (r"py:.*", r"metadata\.EntryPoint"),
    (r"py:.*", r"nn\.(Module|MultiheadAttention)"),
]

# Tags for pages that depend on modules still being written: flash.nn, flash.testing.
HAS_NN = importlib.util.find_spec("flash.nn") is not None
HAS_TESTING = importlib.util.find_spec("flash.testing") is not None
for _name, _present in (("flash_nn", HAS_NN), ("flash_testing", HAS_TESTING)):
    if _present:
        tags.add(_name)  # type: ignore[name-defined]  # noqa: F821  (Sphinx injects ``tags``)

# -- autodoc -----------------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# flash.integrations.transformers imports transformers, which the docs build does not install.
autodoc_mock_imports = ["transformers"]
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
python_use_unqualified_type_names = True

# -- doctest -----------------------------------------------------------------------------------
# Every example runs on the CPU, with the reference backend only (what CI has).

doctest_global_setup = f"""
import math
import torch
import flash
torch.manual_seed(0)
HAS_NN = {HAS_NN!r}
HAS_TESTING = {HAS_TESTING!r}
"""
doctest_test_doctest_blocks = ""  # only explicit ``doctest`` directives are tests

# -- HTML --------------------------------------------------------------------------------------

html_theme = "furo"
html_title = f"flash {release}"
html_static_path = ["_static"]
html_css_files = ["flash.css"]
html_last_updated_fmt = "%Y-%m-%d"
html_show_sourcelink = False
html_theme_options = {
    "sidebar_hide_name": False,
    "navigation_with_keys": True,
    "light_css_variables": {"color-brand-primary": "#b4451f", "color-brand-content": "#b4451f"},
    "dark_css_variables": {"color-brand-primary": "#ff8a5c", "color-brand-content": "#ff8a5c"},
}
pygments_style = "friendly"
pygments_dark_style = "monokai"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# MathJax is loaded from its CDN by default. To render formulas offline (the screenshot script
# does), point FLASH_DOCS_MATHJAX at a local MathJax 3 "es5" folder; it is copied into _static.
_mathjax_dir = os.environ.get("FLASH_DOCS_MATHJAX")
if _mathjax_dir and Path(_mathjax_dir, "tex-mml-chtml.js").is_file():
    html_static_path.append(_mathjax_dir)
    mathjax_path = "tex-mml-chtml.js"

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# -- flash_docs --------------------------------------------------------------------------------

# Where the benchmark JSON files are read from (relative to docs/). Override with
# FLASH_DOCS_BENCH_RESULTS to preview plots from results that are not committed.
flash_bench_results = os.environ.get("FLASH_DOCS_BENCH_RESULTS", "benchmarks/results")
