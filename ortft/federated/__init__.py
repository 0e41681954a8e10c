"""Federated fine-tuning with Flower: each device trains the adapter on its own data; only the adapter travels.

ortft.federated.client_app  the ClientApp (device side: trains with ortft's own loop, no torch)
ortft.federated.server_app  the ServerApp (a Flower strategy over adapter weights, saved every round)
ortft.federated.aggregate   numpy helpers: adapters <-> Flower ArrayRecords, weighted means, bytes
ortft.federated.runfolder   the federated run folder (looks like a training run to ortft.run / export)
ortft.federated.local       `ortft federate local`: SuperLink + one SuperNode per shard on loopback
ortft.federated.appdir      the Flower App folder (pyproject.toml) that `flwr run` ships

Only client_app, server_app and local import flwr (the `federated` extra); the rest is numpy only.
"""

FLOWER_REQUIREMENT = "flwr==1.42.*"
MISSING_FLOWER_HINT = "install the federated extra: pip install 'ortft[federated]' (Flower 1.42)"


def require_flower():
    """Import flwr, or raise a user error that says which extra to install."""
    try:
        import flwr
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError("Flower (flwr) is not installed in this environment", hint=MISSING_FLOWER_HINT) from exc
    return flwr
