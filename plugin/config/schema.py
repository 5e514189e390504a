"""The train and inference config schemas (schemas/<name>.schema.json): reading them, what the train
schema says of each key (its default, why, and whether it is operational), the config reference
generated from it, and every violation worded as `dotted.path: reason`."""

from __future__ import annotations

import difflib
import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft7Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from plugin.config.typed import NetworkChoice, NetworkSpec
from plugin.errors import InvalidConfig

TRAIN_SCHEMA = "train_config"
INFERENCE_SCHEMA = "inference_config"


@functools.lru_cache(maxsize=None)
def read_schema(schema_name: str) -> dict:
    """The JSON schema `schema_name` (train_config, inference_config) as it ships in schemas/."""
    text = resources.files("schemas").joinpath(f"{schema_name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def train_properties() -> dict:
    return read_schema(TRAIN_SCHEMA)["properties"]


# The schema is where each train key's default, meaning and role live (`default`, `description`,
# `$comment` for why, `x-operational`); these are read from it, and docs/config.md is generated from it.
TRAIN_DEFAULTS: dict = {key: prop["default"] for key, prop in train_properties().items() if "default" in prop}

# Keys that change how a run is operated, not what each step learns: a resumed run may change them
# (another number of processes, a longer budget after a preemption, fewer kept checkpoints).
OPERATIONAL_KEYS: frozenset[str] = frozenset(key for key, prop in train_properties().items()
                                             if prop.get("x-operational"))

_NEW_TASK_NETWORK = train_properties()["network"]["x-new-task-default"]

# A new task's network (no network section, no model/).
DEFAULT_NETWORK = NetworkChoice(NetworkSpec(_NEW_TASK_NETWORK["arch"], _NEW_TASK_NETWORK["encoder"]),
                                _NEW_TASK_NETWORK["encoder_weights"])


def check_schema(config: dict, schema_name: str, where: str) -> None:
    """Raise one TaskError listing every violation of schemas/<schema_name>.schema.json, each with its path."""
    raise_if_any(schema_errors(config, schema_name), where)


def schema_errors(config: Any, schema_name: str) -> list[str]:
    """Every violation as `dotted.path: reason`, sorted by path."""
    lines: list[str] = []
    for error in validator(schema_name).iter_errors(config):
        lines.extend(_describe(error))
    return sorted(lines)


def raise_if_any(errors: list[str], where: str) -> None:
    if errors:
        count = f"{len(errors)} problem" + ("s" if len(errors) > 1 else "")
        message = f"invalid config ({count}):\n" + "\n".join(f"  {line}" for line in errors)
        raise InvalidConfig(message, errors, where=where)


@functools.lru_cache(maxsize=None)
def validator(schema_name: str) -> Validator:
    schema = read_schema(schema_name)
    cls = validator_for(schema, default=Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _dotted(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: ValidationError) -> list[str]:
    parent = list(error.absolute_path)
    if "x-expected" in error.schema:
        # The schema's own wording of the value it wants, instead of a regex or "not valid under any of...".
        return [f"{_dotted(parent)}: {error.instance!r} is not {error.schema['x-expected']}"]
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return [
            f"{_dotted(parent + [key])}: unknown key ({_suggest(key, allowed)})"
            for key in sorted(set(error.instance) - set(allowed))
        ]
    if error.validator == "required":
        # jsonschema yields one error per missing key and names it only in the message.
        key = next(k for k in error.validator_value if error.message == f"{k!r} is a required property")
        return [f"{_dotted(parent + [key])}: missing required key"]
    if error.validator in ("minLength", "minItems"):
        # Worded here: jsonschema's text for these changed between releases ("is too short" / "should be non-empty").
        count = error.validator_value
        need = "must not be empty" if count == 1 else f"needs at least {count} " + (
            "characters" if error.validator == "minLength" else "items")
        return [f"{_dotted(parent)}: {error.instance!r} {need}"]
    if error.validator == "exclusiveMinimum":
        return [f"{_dotted(parent)}: {error.instance!r} must be greater than {error.validator_value!r}"]
    return [f"{_dotted(parent)}: {error.message}"]


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)


def coerce_integers(value: Any, schema: dict) -> Any:
    # Draft 7 accepts 3.0 as an integer; the code downstream needs a real int (range(), num_workers).
    types = schema.get("type")
    if (types == "integer" or isinstance(types, list) and "integer" in types) and isinstance(value, float):
        return int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {key: coerce_integers(item, props.get(key, {})) for key, item in value.items()}
    if isinstance(value, list):
        return [coerce_integers(item, schema.get("items", {})) for item in value]
    return value


def config_reference() -> str:
    """docs/config.md: every train key with its default and meaning, from the schema (`make docs`)."""
    lines = [
        "# Train config reference",
        "",
        "Generated from [`schemas/train_config.schema.json`](../schemas/train_config.schema.json) by `make docs`;",
        "`make test` fails when this page and the schema differ. `task_config.json` is merged over these",
        "defaults (nested objects key by key, lists and values replaced), then validated against the schema:",
        "every violation is reported at once with its path, and unknown keys are errors.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, prop in train_properties().items():
        default = prop.get("default", prop.get("x-new-task-default"))
        children = prop.get("properties", {})
        name = f"{key}.{'/'.join(children)}" if children and isinstance(default, dict) else key
        meaning = prop["description"]
        if "x-new-task-default" in prop:
            meaning += " Default: a new task's network."
        parts = [f"`{child}`: {sub['description']}" for child, sub in children.items() if "description" in sub]
        cell = " ".join([meaning, *parts]).replace("|", "\\|")
        lines.append(f"| `{name}` | {_rendered(default)} | {cell} |")
    return "\n".join(lines) + "\n"


def _rendered(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(_rendered(v) for v in value.values())
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{len(value)} steps"
    return str(value) if isinstance(value, str) else json.dumps(value)
