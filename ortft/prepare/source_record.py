"""What a bundle's manifest records about where it was made: file and folder names, not host paths.

A bundle travels to other people and devices; the absolute paths of the workstation that prepared it
(user names, folder layout) stay there unless `ortft prepare --record-source-path` asks to keep the
paths as they were given. The source model's weights are identified by their sha256 either way.
"""

from __future__ import annotations

from pathlib import Path


def recorded_path(path: str | Path | None, record: bool) -> str | None:
    """`path` as given (with --record-source-path) or reduced to its last part."""
    if path is None or str(path) == "":
        return None
    return str(path) if record else (Path(path).expanduser().resolve().name or str(path))


def recorded_prepare(config, argv: list[str]) -> dict:
    """The manifest's `prepare.command` and `prepare.config`: the paths in them reduced to names unless recorded."""
    settings = config.to_dict()
    words = list(argv)
    if not config.record_source_path:
        given = {str(value): recorded_path(value, False) for value in (config.model, config.out, config.adapter) if value}
        for key in ("model", "out", "adapter"):
            settings[key] = recorded_path(settings.get(key), False)
        for index, word in enumerate(words):
            flag, equals, value = word.partition("=")
            if index == 0:
                words[index] = Path(word).name
            elif word in given:
                words[index] = given[word]
            elif equals and value in given:
                words[index] = f"{flag}={given[value]}"
    return {"command": " ".join(words), "config": settings}
