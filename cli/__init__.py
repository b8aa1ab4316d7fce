"""The `msif` command line (installed as msif_index.cli): thin typer commands over library functions."""
