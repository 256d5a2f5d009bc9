"""``python -m mfac`` runs the ``mfac`` command."""

from .cli import run_program

run_program()
