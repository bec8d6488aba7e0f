"""Plugins shipped with the trainer; see utils/plugins.py and doc/PLUGINS.md."""
