"""`cascadeseg` sub-commands: each module defines `register(subparsers)` (see cli.py)."""
