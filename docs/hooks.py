"""MkDocs hooks: the parts of the manual that are generated, so that they cannot drift.

- docs/configuration.md's marker line ``<!-- config-reference -->`` is replaced by
  ``normbench.schema.reference_markdown()``: the config keys' tables, made from the schema
  that the checks use.
- ``benchmarks/README.md`` (the measured figures, kept beside the scripts that take them)
  joins the site as ``benchmarks.md``; its links into ``../docs/`` become site links.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

MARKER = "<!-- config-reference -->"
ROOT = Path(__file__).resolve().parent.parent  # the checkout that holds mkdocs.yml


def on_config(config):
    # The checkout's normbench, not another one installed in the environment.
    sys.path.insert(0, str(ROOT))
    return config


def on_files(files, config):
    figures = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    files.append(
        File.generated(config, "benchmarks.md", content=figures.replace("](../docs/", "]("))
    )
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "configuration.md":
        return markdown
    lines = markdown.splitlines()
    if sum(line.strip() == MARKER for line in lines) != 1:
        # Without the marker the page would silently lose its reference.
        raise PluginError(f"docs/configuration.md must hold the line {MARKER} exactly once")
    from normbench.schema import reference_markdown

    reference = reference_markdown().strip("\n")
    return "\n".join(reference if line.strip() == MARKER else line for line in lines) + "\n"
