"""Registers ``optimum-cli mc`` (optimum-cli imports every module of the ``optimum.commands.register`` namespace)."""

from ..mc import MCCommand

REGISTER_COMMANDS = [MCCommand]
