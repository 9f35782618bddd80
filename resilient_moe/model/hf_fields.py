"""Reading a Hugging Face checkpoint's JSON files: typed field access whose errors name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resilient_moe.errors import ConfigError


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data



class FieldReader:
    """Typed access to config.json fields with errors that name the field."""

    _missing = object()

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def _get(self, name: str, default: Any, alias: str | None = None) -> Any:
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if alias is not None and self.raw.get(alias) is not None:
            return self.raw[alias]
        if default is self._missing:
            raise ConfigError(f"{self.source}: required field {name!r} is missing")
        return default

    def int(self, name: str, default: Any = _missing, alias: str | None = None) -> int:
        value = self._get(name, default, alias)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be an integer, got {value!r}")
        return value

    def optional_int(self, name: str) -> int | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be an integer or null, got {value!r}")
        return value

    def float(self, name: str, default: Any = _missing) -> float:
        value = self._get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be a number, got {value!r}")
        return float(value)

    def optional_float(self, name: str) -> float | None:
        value = self.raw.get(name)
        return None if value is None else self.float(name)

    def bool(self, name: str, default: Any = _missing) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {name} must be true or false, got {value!r}")
        return value

    def str(self, name: str, default: Any = _missing) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.source}: {name} must be a string, got {value!r}")
        return value
