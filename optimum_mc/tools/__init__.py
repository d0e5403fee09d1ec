"""User-facing tools: the command line, the offline demo, evaluation, inspection and speed measurement."""
