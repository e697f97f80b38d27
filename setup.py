"""Packaging: the top-level ``templates/`` folder ships as ``kvrouter.templates``."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kvrouter", "kvrouter.*"]) + ["kvrouter.templates"],
    package_dir={"kvrouter.templates": "templates"},
    package_data={"kvrouter.templates": ["*.j2"], "kvrouter.ui": ["*.html", "*.js", "*.css"]},
)
