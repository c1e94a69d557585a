"""``python -m reflexarc``: the same as the ``reflexarc`` command."""

from reflexarc.cli import main

main()
