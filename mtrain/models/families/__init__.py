"""Model families: one module each, found automatically. Each defines its config dataclass and model class and
registers them with :func:`mtrain.models.registry.register`; importing this package imports every family."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
