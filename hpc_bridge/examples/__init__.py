"""Example apps and ``site.yaml`` files for the HPC bridge (also used by its tests)."""
