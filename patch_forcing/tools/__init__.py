"""Command-line tools (`python -m patch_forcing.tools.<name>`)."""
