"""The dialect table and builders: exact shapes per docs/contract.md §5/§6 and PROTOCOLS.md."""

from __future__ import annotations

import orjson
import pytest

from relay.sessions.dialect import (
    BETA,
    GA,
    append_audio,
    dialect_for,
    phone_session_update,
    response_create,
    truncate,
    voice_update,
)


def test_dialect_for_names() -> None:
    assert dialect_for("ga") is GA
    assert dialect_for("beta") is BETA
    with pytest.raises(ValueError, match="dialect"):
        dialect_for("v2")


def test_event_names() -> None:
    assert GA.audio_delta == "response.output_audio.delta"
    assert BETA.audio_delta == "response.audio.delta"
    assert (GA.audio_done, BETA.audio_done) == ("response.output_audio.done", "response.audio.done")
    assert GA.transcript_delta == "response.output_audio_transcript.delta"
    assert BETA.transcript_delta == "response.audio_transcript.delta"
    assert GA.speech_started == BETA.speech_started == "input_audio_buffer.speech_started"
    assert GA.response_done == BETA.response_done == "response.done"
    assert (GA.beta_header, BETA.beta_header) == (False, True)


def test_dialect_is_frozen() -> None:
    with pytest.raises(AttributeError):
        GA.audio_delta = "x"  # type: ignore[misc]


def test_voice_update() -> None:
    assert voice_update(GA, "ash") == {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"output": {"voice": "ash"}}},
    }
    assert voice_update(BETA, "ash") == {"type": "session.update", "session": {"voice": "ash"}}


@pytest.mark.parametrize("vad", [True, False])
def test_phone_session_update_ga(vad: bool) -> None:
    update = phone_session_update(GA, voice="marin", instructions="Be brief.", turn_detection=vad)
    assert update == {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": "Be brief.",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {"type": "server_vad"} if vad else None,
                },
                "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
            },
        },
    }
    # Turn detection off must be an explicit JSON null, not a missing key.
    assert b'"turn_detection":null' in orjson.dumps(update) or vad


@pytest.mark.parametrize("vad", [True, False])
def test_phone_session_update_beta(vad: bool) -> None:
    update = phone_session_update(BETA, voice="ash", instructions="Hi.", turn_detection=vad)
    assert update == {
        "type": "session.update",
        "session": {
            "modalities": ["text", "audio"],
            "instructions": "Hi.",
            "voice": "ash",
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": {"type": "server_vad"} if vad else None,
        },
    }


def test_builders_return_fresh_dicts() -> None:
    a = phone_session_update(GA, voice="ash", instructions="x", turn_detection=True)
    b = phone_session_update(GA, voice="ash", instructions="x", turn_detection=True)
    a["session"]["audio"]["output"]["voice"] = "echo"  # type: ignore[index]
    assert b["session"]["audio"]["output"]["voice"] == "ash"  # type: ignore[index]


def test_response_create() -> None:
    for d in (GA, BETA):
        assert response_create(d) == {"type": "response.create"}
        assert response_create(d, "Say goodbye.") == {
            "type": "response.create",
            "response": {"instructions": "Say goodbye."},
        }


def test_truncate_and_append() -> None:
    assert truncate("item_1", 340) == {
        "type": "conversation.item.truncate",
        "item_id": "item_1",
        "content_index": 0,
        "audio_end_ms": 340,
    }
    assert append_audio("AAAA") == {"type": "input_audio_buffer.append", "audio": "AAAA"}
