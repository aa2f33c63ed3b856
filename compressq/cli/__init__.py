"""The command line: the Typer app (app.py), one module per command, views/ for rendering."""
