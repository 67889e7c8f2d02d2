"""One changelog page per package, generated before reading from ``packages/*/CHANGELOG.md``.

Each ``docs/changelog/pkg-<package>.md`` includes the package's own file (MyST ``include``, so it
is rebuilt when the file changes); a package without a changelog yet gets a page that says so.
The generated pages are git-ignored.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx

from flash_docs.rst import write_if_changed


def generate(app: Sphinx) -> None:
    docs = Path(app.srcdir)
    packages = docs.parent / "packages"
    target = docs / "changelog"
    wanted = set()
    for package in sorted(p for p in packages.iterdir() if p.is_dir()) if packages.is_dir() else []:
        page = target / f"pkg-{package.name}.md"
        wanted.add(page.name)
        changelog = package / "CHANGELOG.md"
        if changelog.is_file():
            body = (
                f"# {package.name}\n\n"
                f"```{{include}} ../../packages/{package.name}/CHANGELOG.md\n"
                ":heading-offset: 1\n"
                "```\n"
            )
        else:
            body = f"# {package.name}\n\n`packages/{package.name}` has no `CHANGELOG.md` yet.\n"
        write_if_changed(page, body)
    for stale in target.glob("pkg-*.md"):  # a package that went away
        if stale.name not in wanted:
            stale.unlink()
