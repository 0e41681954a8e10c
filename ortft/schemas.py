"""The expected types of the JSON files ortft reads back: bundle and export manifests, run.json,
trainer_state.json and best.json (checked with ortft/json_types.py before any field is used).

Only what ortft reads is required; other keys may be present. Paths inside a folder are relative
(`RELATIVE_PATH`): no absolute path, no `..` leaving the folder, no backslash (see ortft/trust.py).
"""

from __future__ import annotations

import re

from .json_types import Any, Custom, Int, ListOf, MapOf, Null, Number, Obj, OneOf, Str


def _tasks() -> tuple[str, ...]:
    from .config import TASKS

    return TASKS


SHA256 = Custom("a sha256 digest (64 hexadecimal digits)", lambda value: isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None)


def is_relative_member(value) -> bool:
    """A path relative to its folder that stays inside it (see ortft.trust.member_parts)."""
    from .trust import member_parts

    try:
        member_parts(value)
    except ValueError:
        return False
    return True


RELATIVE_PATH = Custom("a relative path inside the folder (no '..', no absolute path, no backslash)", is_relative_member)
OPTIONAL_PATH = OneOf(RELATIVE_PATH, Null())
FILE_TABLE = MapOf(Obj({"sha256": SHA256, "bytes": Int(min=0)}))
TOKEN_ID = OneOf(Int(min=0), Null())
SHAPE = ListOf(Int(min=0), max_items=8)

TRAINABLE_ENTRY = Obj({
    "name": Str(max_length=1000),
    "shape": SHAPE,
    "peft_key?": Str(max_length=1000),
    "role?": Str(max_length=100),
    "module?": Str(max_length=1000),
    "base_weight?": OneOf(Str(max_length=1000), Null()),
})

BUNDLE_MANIFEST = Obj({
    "format": Str(max_length=100),
    "format_version": Int(min=0),
    "files": FILE_TABLE,
    "task": Custom("a task ortft knows (ortft.config.TASKS)", lambda value: value in _tasks()),
    "labels?": OneOf(ListOf(Str(max_length=1000)), Null()),
    "model": Obj({
        "vocab_size?": Int(min=1),
        "max_seq_len?": Int(min=1),
        "num_layers?": Int(min=0),
        "hidden_size?": Int(min=1),
        "bos_token_id?": TOKEN_ID,
        "eos_token_ids?": ListOf(Int(min=0)),
        "pad_token_id?": TOKEN_ID,
    }),
    "adapter?": Obj({
        "rank?": Int(min=1),
        "alpha?": Number(),
        "scale?": Number(),
        "dropout?": Number(min=0.0),
        "targets?": ListOf(Str(max_length=1000)),
        "layers?": OneOf(ListOf(Int(min=0)), Null()),
        "modules_to_save?": OneOf(ListOf(Str(max_length=1000)), Null()),
        "init_from?": OneOf(Str(), Null()),
    }),
    "optimizer?": Obj({
        "weight_decay?": Number(min=0.0),
        "max_grad_norm?": Number(min=0.0),
        "eps?": Number(min=0.0),
        "betas?": ListOf(Number(min=0.0), max_items=2),
    }),
    "trainable": ListOf(TRAINABLE_ENTRY),
    "initial_adapter_zeros?": ListOf(Str(max_length=1000)),
    "frozen?": ListOf(Str(max_length=1000)),
    "frozen_weights?": OneOf(Obj({"file?": RELATIVE_PATH, "tensors?": Int(min=0), "bytes?": Int(min=0)}), Null()),
    "num_trainable_parameters?": Int(min=0),
    "num_frozen_parameters?": Int(min=0),
    "quantization?": OneOf(Obj({}), Null()),
    "tokenizer": Obj({
        "dir": RELATIVE_PATH,
        "chat_template?": OPTIONAL_PATH,
        "source_facts?": OneOf(Obj({}), Null()),
    }),
    "inference?": OneOf(Null(), Obj({
        "model": RELATIVE_PATH,
        "config?": OPTIONAL_PATH,
        "weights?": MapOf(Obj({"initializer": Str(max_length=1000), "layout?": Str(max_length=20)})),
        "inputs?": ListOf(Obj({})),
        "outputs?": ListOf(Obj({})),
    })),
    "source?": Obj({}),
    "upgraded_from?": Obj({"manifest_sha256?": SHA256}),
})

EXPORT_MANIFEST = Obj({
    "format": Str(max_length=100),
    "kind": Str(max_length=100),
    "files": FILE_TABLE,
    "model?": OneOf(Obj({"eos_token_ids?": ListOf(Int(min=0)), "max_seq_len?": Int(min=1)}), Null()),
    "tokenizer?": OneOf(Obj({"dir?": OneOf(RELATIVE_PATH, Custom("'.'", lambda value: value == ".")),
                             "chat_template?": OPTIONAL_PATH}), Null()),
    "quantization?": OneOf(Obj({"scheme?": Str(max_length=20)}), Null()),
    "adapters?": MapOf(Obj({"file": RELATIVE_PATH})),
    "source?": Obj({}),
})

RUN_INFO = Obj({
    "bundle": Str(max_length=4096),
    "bundle_manifest_sha256?": OneOf(SHA256, Null()),
    "task?": Str(max_length=100),
    "kind?": Str(max_length=100),
})

CHECKPOINT_FILE_NAME = Custom("a plain file name", lambda value: is_relative_member(value) and "/" not in value)

TRAINER_STATE = Obj({
    "step": Int(min=0),
    "files": Custom("an object of file name -> sha256", lambda value: isinstance(value, dict) and all(
        CHECKPOINT_FILE_NAME.problem(name, "") is None and SHA256.problem(digest, "") is None for name, digest in value.items())),
    "round?": Int(min=0),
    "data_position?": Any(),
    "config?": Obj({}),
    "best?": OneOf(Obj({}), Null()),
    "data_sha256?": MapOf(OneOf(SHA256, Null())),
    "learning_rate?": Number(),
})

BEST = Obj({
    "checkpoint": Custom("a checkpoints/step-NNNNNNNN path inside the run", lambda value: isinstance(value, str)
                         and re.fullmatch(r"checkpoints/step-\d{8}", value) is not None),
    "step": Int(min=0),
    "eval_loss": Number(),
})
