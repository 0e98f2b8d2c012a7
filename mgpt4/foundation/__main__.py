"""``python -m mgpt4.foundation build|check``: the maintainer tool, in ``mgpt4.cli.foundation``."""

from mgpt4.cli.foundation import run

run()
