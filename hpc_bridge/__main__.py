"""``python -m reflexarc.hpc_bridge site run site.yaml`` (same verbs as ``reflexarc``)."""

from reflexarc.hpc_bridge.cli import main

main()
