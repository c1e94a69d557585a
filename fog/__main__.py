"""``python -m reflexarc.fog run fog.yaml``: the fog CLI without the main ``reflexarc`` entry point."""

from reflexarc.fog.cli import app

if __name__ == "__main__":
    app()
