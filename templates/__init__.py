"""Jinja2 templates of the files kvrouter renders (shipped as kvrouter.templates)."""
