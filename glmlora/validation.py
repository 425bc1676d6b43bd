"""Config checks that run before any model work (``glmlora.train``): one message per problem, with the file,
line and key.

The schemas are declarative (pydantic, strict: ``1`` is no boolean, ``"8"`` no integer) and built from the
signatures they guard: ``training:`` from ``TrainingArguments``' own field annotations (so every field and its
type is known, as transformers' ``HfArgumentParser`` knows them — but ``HfArgumentParser.parse_dict`` hands YAML
values to the dataclass unchecked), ``lora:`` from ``glmlora.lora.lora_config``'s parameters, the top level from
``TrainConfig``. What a run needs beyond types (a positive learning rate, checkpoints every N >= 1 steps or every
fraction of the run, ...) is a table of limits next to them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ConfigError(ValueError):
    """A config file problem; the message names the file, the line and the key."""


# ---------------------------------------------------------------------------------------------- YAML with lines
def read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The parsed YAML and the line of every key (``"training.learning_rate"`` -> 14).

    A key written twice in one mapping is an error: YAML loaders keep the last one silently.
    """
    import yaml

    from .data import DataError, read_text

    if not path.is_file():
        raise ConfigError(f"{path}: no such config file" if not path.exists() else f"{path}: is not a file")
    try:
        text = read_text(path)
    except DataError as e:
        raise ConfigError(str(e.problems[0])) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, str(path))
    return data, lines


def _key_lines(node: Any, prefix: str, lines: dict[str, int], source: str) -> None:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        name = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if name in lines:
            raise ConfigError(f"{source}:{line}: key '{name}' is written twice (also on line {lines[name]}); "
                              f"YAML would silently keep only the last one")
        lines[name] = line
        _key_lines(value_node, f"{name}.", lines, source)


def where(source: str, lines: dict[str, int], key: str) -> str:
    """``file:line`` of ``key`` (or of its section), else just the file."""
    while key:
        if key in lines:
            return f"{source}:{lines[key]}"
        key = key.rpartition(".")[0]
    return source


# ---------------------------------------------------------------------------------------------- value checks
def _float_text(value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as text: take such text as the number it spells."""
    return float(value) if isinstance(value, str) and _FLOAT_TEXT.match(value) else value


def _steps(value: float) -> float:
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise ValueError("a whole number of steps >= 1, or a fraction of the run between 0 and 1 (0.25: every quarter)")


def _max_steps(value: int) -> int:
    if value == -1 or value >= 1:
        return value
    raise ValueError("a positive number of optimizer steps, or -1 (the default: train num_train_epochs)")


Steps = Annotated[Union[int, float], AfterValidator(_steps)]
#: Limits beyond the types, for the ``training:`` keys a learner changes most.
TRAINING_LIMITS: dict[str, Any] = {
    "learning_rate": Annotated[float, Field(gt=0)],
    "per_device_train_batch_size": Annotated[int, Field(ge=1)],
    "per_device_eval_batch_size": Annotated[int, Field(ge=1)],
    "gradient_accumulation_steps": Annotated[int, Field(ge=1)],
    "num_train_epochs": Annotated[float, Field(ge=0)],  # 0 only together with max_steps (see check_run_length)
    "max_steps": Annotated[int, AfterValidator(_max_steps)],
    "save_steps": Steps,
    "eval_steps": Steps | None,
    "logging_steps": Steps,
    "warmup_steps": Annotated[float, Field(ge=0)],
    "weight_decay": Annotated[float, Field(ge=0)],
    "max_grad_norm": Annotated[float, Field(ge=0)],
    "adam_beta1": Annotated[float, Field(ge=0, lt=1)],
    "adam_beta2": Annotated[float, Field(ge=0, lt=1)],
    "adam_epsilon": Annotated[float, Field(gt=0)],
    "save_total_limit": Annotated[int, Field(ge=1)] | None,
    "dataloader_num_workers": Annotated[int, Field(ge=0)],
    "seed": Annotated[int, Field(ge=0)],
}
LORA_LIMITS: dict[str, Any] = {
    "r": Annotated[int, Field(ge=1)],
    "alpha": Annotated[int, Field(gt=0)],
    "dropout": Annotated[float, Field(ge=0, lt=1)],
    "target_modules": Annotated[list[str], Field(min_length=1)],
}
#: Keys of TrainingArguments that the config sets elsewhere.
MOVED = {"output_dir": "the top-level key 'output_dir'", "resume_from_checkpoint": "the top-level key 'resume'"}


def _choices(hint: Any) -> Any:
    """``SchedulerType | str`` -> the enum's values as a Literal, so a typo is named at once, not in
    ``TrainingArguments``' own check after everything else was read."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if not enums:
        return hint
    values = tuple(v.value for e in enums for v in e)
    return Literal[values] | None if type(None) in args else Literal[values]


def _has_float(hint: Any) -> bool:
    return hint is float or any(_has_float(a) for a in typing.get_args(hint))


def _lenient_floats(hint: Any) -> Any:
    """Accept ``2e-4`` written without a dot wherever a number is meant."""
    return Annotated[hint, BeforeValidator(_float_text)] if _has_float(hint) else hint


def schema(name: str, hints: dict[str, Any], limits: dict[str, Any]) -> type[BaseModel]:
    """A strict pydantic model with one optional field per key: ``limits`` where given, else the type hint."""
    fields = {key: (_lenient_floats(limits.get(key, _choices(hint))), None) for key, hint in hints.items()}
    config = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True)
    return create_model(name, __config__=config, **fields)


@functools.cache
def training_schema() -> type[BaseModel]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in MOVED}
    return schema("training", keys, TRAINING_LIMITS)


@functools.cache
def lora_schema() -> type[BaseModel]:
    from .lora import lora_config

    hints = typing.get_type_hints(lora_config)
    return schema("lora", {k: hints[k] for k in LORA_LIMITS}, LORA_LIMITS)


def validate(model: type[BaseModel], data: Any, section: str, source: str, lines: dict[str, int]) -> dict[str, Any]:
    """The keys of ``data`` checked by ``model`` (values as validated), or a ConfigError for the first bad one."""
    prefix = f"{section}." if section else ""
    if data is None:
        return {}
    if not isinstance(data, dict):
        what = f"section '{section}'" if section else "the top level"
        raise ConfigError(f"{where(source, lines, section)}: {what} must be a mapping (key: value lines), "
                          f"got {type(data).__name__}")
    for key in data:
        if section == "training" and key in MOVED:
            raise ConfigError(f"{where(source, lines, prefix + key)}: key '{prefix}{key}' is set by {MOVED[key]} "
                              f"instead")
    try:
        checked = model.model_validate(data)
    except ValidationError as e:
        raise _message(e, data, model, section, source, lines) from None
    return {k: getattr(checked, k) for k in data if k in checked.model_fields_set}


def _message(error: ValidationError, data: dict[str, Any], model: type[BaseModel], section: str, source: str,
             lines: dict[str, int]) -> ConfigError:
    """One message for the first key that failed, whatever the number of union branches pydantic tried."""
    errors = error.errors()
    key = errors[0]["loc"][0]
    name = f"{section}.{key}" if section else str(key)
    at = where(source, lines, name)
    if errors[0]["type"] == "extra_forbidden":
        return ConfigError(f"{at}: {_unknown(name, str(key), list(model.model_fields), section)}")
    wants, nullable = [], False
    for e in errors:
        if e["loc"][:1] != (key,):
            continue
        if e["type"] == "none_required":
            nullable = True
            continue
        want = _SHORT.get(e["type"]) or re.sub(r"^(Input should be|Value error, )\s*", "", e["msg"])
        items = [x for x in e["loc"][1:] if isinstance(x, int)]
        want = f"a list (item {items[0]}: {want})" if items else want
        if want not in wants:
            wants.append(want)
    value = data[key]
    must = " or ".join(wants) + (", or null" if nullable else "")
    return ConfigError(f"{at}: key '{name}' must be {must}, got {type(value).__name__} {value!r}")


_SHORT = {"string_too_short": "non-empty text", "too_short": "a non-empty list"}


def _unknown(name: str, key: str, keys: list[str], section: str) -> str:
    """The known keys when there are few, the nearest ones when there are many (TrainingArguments)."""
    place = f"section '{section}'" if section else "the top level"
    if len(keys) <= 15:
        return f"unknown key '{name}' in {place}; known keys: {', '.join(sorted(keys))}"
    near = difflib.get_close_matches(key, keys, n=3)
    hint = f"did you mean {' or '.join(repr(k) for k in near)}?" if near else "see the TrainingArguments fields"
    return f"unknown key '{name}' in {place} ({hint})"


# ---------------------------------------------------------------------------------------------- beyond one key
def run_length_problem(training: dict[str, Any]) -> tuple[str, str] | None:
    """``(key, message)`` when the run would train nothing: epochs set to 0 and no max_steps (the defaults
    of every profile train a few epochs)."""
    epochs = training.get("num_train_epochs")
    if epochs is not None and epochs <= 0 and training.get("max_steps", -1) <= 0:
        return "num_train_epochs", (f"is {epochs} and max_steps is not set: nothing would be trained; set "
                                    f"num_train_epochs > 0 or max_steps > 0")
    return None


def report_to_problem(value: Any) -> str | None:
    """Integrations in ``report_to`` that transformers does not know or that are not installed."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], ["all"], []):
        return None
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        return f"has unknown integration(s) {unknown}; known: none, all, {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        return (f"names {', '.join(missing)}, which is not installed: pip install {' '.join(missing)}, "
                f"or set report_to: none")
    return None


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory this process writes into; None when it can.
    Nothing is created: the check runs before anything is written."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: {parent} is not writable"
    return None
