"""The `cdc` command (click): `main` is the group (cli.group); importing the verb modules registers
their commands on it."""

from cdc.cli.group import main
from cdc.cli import inspect_commands, pipeline_commands, sink_commands, verify_commands

__all__ = ["main", "inspect_commands", "pipeline_commands", "sink_commands", "verify_commands"]
