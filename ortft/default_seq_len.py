"""The --seq-len a command uses when the user gave none: the usual default, cut to the bundle's max_seq_len.

A bundle records the longest row it takes (`model.max_seq_len`: the model's context, or prepare's
--max-seq-len); a default longer than that would make `train` refuse a setting the user never gave.
"""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_SEQ_LEN

# The help text of a --seq-len option whose default follows the bundle.
SEQ_LEN_DEFAULT_HELP = f"[default: {DEFAULT_SEQ_LEN}, or the bundle's max_seq_len if smaller]"


def fitted_seq_len(bundle: Path | str) -> int:
    """DEFAULT_SEQ_LEN, or the bundle's max_seq_len if that is smaller.

    Reads the bundle's manifest (a BundleError if the folder holds none), as the command itself would next.
    """
    from .manifest import read_manifest

    return min(DEFAULT_SEQ_LEN, int(read_manifest(bundle)["model"]["max_seq_len"]))
