"""The `tgis` command-line entry point."""
