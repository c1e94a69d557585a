"""Test helpers that start real services (see ``reflexarc.testing.slurm``)."""
