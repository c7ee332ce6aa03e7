"""OpenAI Realtime dialects: the event names and client events that differ.

``ga`` is the current Realtime API (``openai.types.realtime``); ``beta`` is the
legacy shape (``OpenAI-Beta: realtime=v1``) that OpenAI shut down in May 2026
and that some compatible providers still speak. Every builder returns a fresh
dict that is valid, as is, for the real service in that dialect; nothing else
in the relay spells an event name that differs between the two.

Pure: no I/O, no trio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DialectName = Literal["ga", "beta"]


@dataclass(frozen=True)
class Dialect:
    """Server event names of one dialect, and whether it needs the beta header."""

    name: DialectName
    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    speech_started: str
    response_done: str
    beta_header: bool


GA = Dialect(
    name="ga",
    audio_delta="response.output_audio.delta",
    audio_done="response.output_audio.done",
    transcript_delta="response.output_audio_transcript.delta",
    transcript_done="response.output_audio_transcript.done",
    speech_started="input_audio_buffer.speech_started",
    response_done="response.done",
    beta_header=False,
)

BETA = Dialect(
    name="beta",
    audio_delta="response.audio.delta",
    audio_done="response.audio.done",
    transcript_delta="response.audio_transcript.delta",
    transcript_done="response.audio_transcript.done",
    speech_started="input_audio_buffer.speech_started",
    response_done="response.done",
    beta_header=True,
)

_BY_NAME: dict[str, Dialect] = {"ga": GA, "beta": BETA}


def dialect_for(name: str) -> Dialect:
    """The dialect called ``name``; ``ValueError`` for anything but "ga"/"beta"."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown Realtime dialect {name!r}; expected 'ga' or 'beta'") from None


def voice_update(d: Dialect, voice: str) -> dict[str, object]:
    """A ``session.update`` that sets the assistant's voice and nothing else."""
    if d.beta_header:
        return {"type": "session.update", "session": {"voice": voice}}
    # GA requires session.type on every update, and the voice lives under audio.output.
    return {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"output": {"voice": voice}}},
    }


def phone_session_update(
    d: Dialect,
    *,
    voice: str,
    instructions: str,
    turn_detection: bool,
    tools: list[dict[str, object]] | None = None,
    transcription_model: str | None = None,
) -> dict[str, object]:
    """The one ``session.update`` of a phone call (docs/contract.md §6, §11).

    G.711 μ-law in and out, spoken answers with transcripts, server VAD or,
    when ``turn_detection`` is false, turn detection explicitly off (JSON null:
    omitting the key would leave the server's default VAD on). ``tools``
    (function tools, the same shape in both dialects) come with
    ``tool_choice: "auto"``; ``transcription_model`` turns on transcription of
    the caller.
    """
    vad: dict[str, object] | None = {"type": "server_vad"} if turn_detection else None
    transcription = {"model": transcription_model} if transcription_model else None
    session: dict[str, object]
    if d.beta_header:
        session = {
            "modalities": ["text", "audio"],
            "instructions": instructions,
            "voice": voice,
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": vad,
        }
        if transcription is not None:
            session["input_audio_transcription"] = transcription
    else:
        # GA: output_modalities may hold only one of text/audio; audio answers still
        # come with output_audio_transcript events, so ["audio"] is "audio with text".
        audio_in: dict[str, object] = {"format": {"type": "audio/pcmu"}, "turn_detection": vad}
        if transcription is not None:
            audio_in["transcription"] = transcription
        session = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": instructions,
            "audio": {
                "input": audio_in,
                "output": {"format": {"type": "audio/pcmu"}, "voice": voice},
            },
        }
    if tools:
        session["tools"] = tools
        session["tool_choice"] = "auto"
    return {"type": "session.update", "session": session}


def response_create(d: Dialect, instructions: str | None = None) -> dict[str, object]:
    """Ask the model to speak; ``instructions`` override the session's for this response only."""
    del d  # the same shape in both dialects; taken so callers never need to know that
    if instructions is None:
        return {"type": "response.create"}
    return {"type": "response.create", "response": {"instructions": instructions}}


def function_output(call_id: str, output: str) -> dict[str, object]:
    """The answer to one function call: ``output`` is JSON text (both dialects)."""
    return {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    }


def user_text(text: str) -> dict[str, object]:
    """A typed message on the caller's side (key presses, docs/contract.md §11)."""
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
    }


def truncate(item_id: str, audio_end_ms: int) -> dict[str, object]:
    """Cut assistant item ``item_id`` at ``audio_end_ms`` of its audio (content part 0)."""
    return {
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": audio_end_ms,
    }


def append_audio(payload_b64: str) -> dict[str, object]:
    """Add base64 caller audio (already in the session's input format) to the input buffer."""
    return {"type": "input_audio_buffer.append", "audio": payload_b64}
