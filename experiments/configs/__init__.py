"""Experiment recipes: each file's ``get_config()`` starts from :func:`diffjax.config.get_config` (every key, its
default and comment) and overrides a few keys. ``--config=experiments/configs/NAME.py`` picks one on the command
line, :func:`diffjax.config.load_config` reads one elsewhere (notebooks, scripts), and
:func:`diffjax.config.validate` checks the result."""
