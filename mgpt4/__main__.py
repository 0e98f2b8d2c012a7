"""``python -m mgpt4`` runs the CLI."""

from mgpt4.cli import main

main()
