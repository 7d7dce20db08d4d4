"""Generates the taxonomy section and two reference pages at build time (run by mkdocs-gen-files).

The pages come from the live registry (built-in and installed third-party techniques), the
taxonomy data and, when a database exists, the results store; see ``effinfer.tools.site``.
Nothing this script writes is checked in.
"""

import mkdocs_gen_files

from effinfer.tools.site import cli_reference, experiment_schema, generate_pages, write_pages

write_pages(generate_pages(), mkdocs_gen_files.open)
write_pages({"reference/cli.md": cli_reference(), "reference/experiment-schema.md": experiment_schema()},
            mkdocs_gen_files.open)
