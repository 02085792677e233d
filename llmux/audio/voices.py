"""Voice names: what clients ask for, mapped to what a speech model has. Pure.

Clients hard-code OpenAI's voices (Open WebUI asks for ``alloy`` by default), so those
names mean "the model's default voice" unless the model configures one of that name.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmux.errors import BadRequest

OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova",
                           "sage", "shimmer", "verse", "marin", "cedar"})
DEFAULT = "default"


def voice_names(voices: Mapping[str, str]) -> list[str]:
    """The names a model answers to; a model without configured voices has one."""
    return list(voices) or [DEFAULT]


def resolve_voice(voices: Mapping[str, str], requested: str | None) -> str:
    """The backend's voice for ``requested``; "" means the backend's default voice.

    Raises:
        BadRequest: a name that is neither the model's nor OpenAI's.
    """
    default = next(iter(voices.values()), "")
    if requested is None or requested in (DEFAULT, ""):
        return default
    if requested in voices:
        return voices[requested]
    if requested.lower() in OPENAI_VOICES or not voices:
        return default
    raise BadRequest(f"The voice '{requested}' does not exist. Voices: "
                     f"{', '.join(voice_names(voices))} (or any of OpenAI's names, which "
                     "mean the default voice).", param="voice")
