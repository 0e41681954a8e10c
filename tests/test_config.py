"""Defaults live in ortft/config.py only: every command's click option defaults equal its config dataclass's."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from ortft.commands import evaluate, export, federate, generate, predict, prepare, train
from ortft.config import (
    EvalConfig,
    ExportConfig,
    FederationConfig,
    GenerateConfig,
    PredictConfig,
    PrepareConfig,
    SamplingSettings,
    TrainConfig,
    default_of,
)

# command -> (its config dataclasses, option -> field where the names differ, flags that are a field's negation,
#             options that are no setting of the dataclass, with why)
COMMANDS = {
    "prepare": (prepare.command, (PrepareConfig,), {"label_names": "labels"},
                {"asymmetric": "quantize_symmetric", "no_recompute": "quantize_recompute",
                 "no_recompute_activations": "recompute_activations"}, set()),
    "train": (train.command, (TrainConfig,), {}, {},
              {"config",  # the YAML file the settings come from
               "stop_after"}),  # a test hook kept in TrainConfig.extra
    "eval": (evaluate.command, (EvalConfig,), {}, {}, {"as_json"}),  # output format
    "export": (export.command, (ExportConfig,), {"export_format": "format"}, {}, set()),
    "generate": (generate.command, (GenerateConfig, SamplingSettings), {}, {}, set()),
    "predict": (predict.command, (PredictConfig,), {}, {}, set()),
    "federate local": (federate.local, (FederationConfig,), {}, {},
                       {"shards", "valid", "valid_fraction", "threads"}),  # the nodes' settings, not the server's
}
# Options whose missing value means "given by the user" or "derived at run time", not a default.
NO_DEFAULT = {("train", "data"), ("train", "out"),  # required (checked once the YAML file is merged)
              ("train", "seq_len"), ("federate local", "seq_len"),  # None: DEFAULT_SEQ_LEN fitted to the bundle
              ("federate local", "min_nodes")}  # None: every shard


def _field_defaults(classes) -> dict:
    return {item.name: default_of(cls, item.name) for cls in classes for item in fields(cls)}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_click_defaults_are_the_config_dataclass_defaults(name):
    command, classes, renamed, negated, not_settings = COMMANDS[name]
    defaults = _field_defaults(classes)
    context = click.Context(command)
    checked = 0
    for param in command.params:
        if param.required or param.name in not_settings or (name, param.name) in NO_DEFAULT:
            continue  # arguments and required options have no default
        default = param.get_default(context)  # what the command gets when the option is not given
        if param.name in negated:
            assert default is (not defaults[negated[param.name]]), f"{name} --{param.name}"
        else:
            field_name = renamed.get(param.name, param.name)
            assert field_name in defaults, f"`ortft {name}` option {param.name!r} has no field in {[c.__name__ for c in classes]}"
            assert default == defaults[field_name], f"`ortft {name}` {param.name}: {default!r} != {defaults[field_name]!r}"
        checked += 1
    assert checked >= 4


def test_the_federation_has_one_set_of_defaults():
    from ortft.federated.appdir import app_pyproject
    from ortft.federated.server_app import ServerSettings

    run_config = FederationConfig.run_config_defaults()
    assert run_config["rounds"] == ServerSettings().rounds == default_of(FederationConfig, "rounds")
    assert run_config["round-timeout"] == ServerSettings().round_timeout
    assert f"round-timeout = {run_config['round-timeout']!r}\n" in app_pyproject()
    settings = ServerSettings.from_run_config({"bundle": "b", "out": "o", "rounds": "7"})
    assert settings.rounds == 7 and settings.lr == TrainConfig().lr


def test_default_of_names_unknown_fields():
    with pytest.raises(KeyError, match="no field 'nope'"):
        default_of(TrainConfig, "nope")
    assert default_of(TrainConfig, "extra") == {}
