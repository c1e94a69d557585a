"""reflexarc: close the loop between instruments and supercomputers."""

__version__ = "0.1.0"
