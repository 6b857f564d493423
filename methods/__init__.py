"""Distillation methods, one file each, registered by name (see methods/base.py). Importing the package
imports every module in it, so a method's file is all it takes to add one."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
