"""One thin module per `tgis` subcommand: parse options, call the runtime, render."""
