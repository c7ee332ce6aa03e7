"""A real browser talks through ``relay demo`` to the fake upstream.

Headless Chromium (Debian's, installed by .ci/run) opens the demo page; its
microphone is Chromium's fake device playing a WAV made here: 440 Hz beeps
at 0, 4, 6 and 8 s. The fake Realtime server in its voice mode hears each
beep as a turn and answers with a 2 s melody, so:

- beep 1 → answer 1, which plays to its end (checked: scheduled in the order
  sent, back to back, and one unbroken run of sound in the rendered output);
- beep 2 → answer 2, which beep 3 interrupts 1.25 s in (checked: playback
  stops, and the one truncate's ``audio_end_ms`` is within 60 ms of the sound
  actually rendered);
- while answer 3 plays, the test presses Mute: beep 4 goes up as silence, so
  nothing interrupts answer 3;
- the session then runs into ``session_seconds`` (close 1000 "session time limit").

What went upstream is read back from the demo's ``/fake/sessions``: the beep
must arrive as 24 kHz PCM16 at 440 Hz. Before that, two refusals are shown in
words: a page opened on a wrong Origin (127.0.0.1 instead of localhost) and
a bogus token.
"""

from __future__ import annotations

import array
import base64
import itertools
import math
import re
import secrets
import signal
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from relay.admission.tokens import mint
from relay.testing.browser import Page, chromium_path, headless_chromium
from relay.testing.daemon import daemon_env, toml_dumps

MIC_RATE = 48_000
TONE_HZ = 440.0
BEEPS_AT = (0.0, 4.0, 6.0, 8.0)  # seconds into the WAV
BEEP_SECONDS = 0.5
WAV_SECONDS = 12.0  # then Chromium loops it; the session ends before that
SESSION_SECONDS = 10
ANSWER_SECONDS = 2.0  # the fake's answer: 10 notes of 200 ms
RATE = 24_000

_URL = re.compile(r"open (http://localhost:(\d+)/)")
READY = "window.relayVoiceDebug && window.relayVoiceDebug.ready"  # the page's script ran


def make_wav(path: Path) -> None:
    samples = array.array("h", bytes(2 * int(WAV_SECONDS * MIC_RATE)))
    for at in BEEPS_AT:
        first = int(at * MIC_RATE)
        for i in range(int(BEEP_SECONDS * MIC_RATE)):
            samples[first + i] = round(16000 * math.sin(2 * math.pi * TONE_HZ * i / MIC_RATE))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MIC_RATE)
        w.writeframes(samples.tobytes())


@asynccontextmanager
async def running_demo(tmp: Path) -> AsyncIterator[tuple[str, int]]:
    """``relay demo`` as a subprocess, no OPENAI_API_KEY: (page URL, page port)."""
    config = tmp / "config.toml"
    config.write_text(
        toml_dumps(
            {
                "server": {"bind": ["127.0.0.1:0"], "drain_seconds": 1},
                "limits": {
                    "session_seconds": SESSION_SECONDS,
                    "goodbye_seconds": 1,
                    "http_per_minute": 100000,
                    "ws_upgrades_per_minute": 100000,
                },
            }
        )
    )
    env = daemon_env()
    del env["OPENAI_API_KEY"], env["ENCRYPTION_KEY"]
    log_path = tmp / "demo.log"
    with open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", "demo", "--config", str(config), "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        while not (found := _URL.search(log_path.read_text())):
            assert proc.returncode is None, log_path.read_text()
            await trio.sleep(0.05)
        yield found.group(1), int(found.group(2))
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        print(log_path.read_text())


async def click_start(page: Page) -> None:
    await page.evaluate("document.getElementById('start').click()", gesture=True)


async def closed_text(page: Page) -> str:
    text: str = await page.wait_for("document.getElementById('closed').textContent")
    return text


def zero_crossing_hz(pcm: array.array[int]) -> float:
    crossings = sum(1 for a, b in itertools.pairwise(pcm) if (a < 0) != (b < 0))
    return crossings / 2 / (len(pcm) / RATE)


def first_beep(pcm: array.array[int]) -> array.array[int]:
    """The samples of the first loud stretch (20 ms blocks above -30 dBFS)."""
    block = RATE // 50
    loud = [
        i
        for i in range(0, len(pcm) - block, block)
        if sum(x * x for x in pcm[i : i + block]) / block > (0.03 * 32768) ** 2
    ]
    assert loud, "no sound arrived upstream"
    start = loud[0]
    end = start
    while end + block in loud:
        end += block
    # Leave out the edges: the browser's processing may ramp them.
    return pcm[start + block : end]


def rendered_run(rendered: list[dict[str, float]], start: float) -> float:
    """Seconds of the run of rendered sound that began at ``start`` (audio clock)."""
    runs = [r for r in rendered if abs(r["start"] - start) < 0.02]
    assert len(runs) == 1, (start, rendered)
    return runs[0]["end"] - runs[0]["start"]


async def test_browser_talks_through_relay_demo(tmp_path: Path) -> None:
    chromium_path()  # fails (does not skip) with how to install it
    wav = tmp_path / "beeps.wav"
    make_wav(wav)
    with trio.fail_after(60):
        async with (
            running_demo(tmp_path) as (url, port),
            headless_chromium(fake_microphone=wav) as browser,
        ):
            # Refusals, shown in words although the browser itself sees only 1006.
            page = await browser.open(f"http://127.0.0.1:{port}/", ready=READY)
            await click_start(page)
            wrong_origin = await closed_text(page)
            # A well-formed token, minted with a key that is not the relay's.
            foreign = mint(secrets.token_bytes(32), 60)
            await page.goto(f"{url}?token={foreign}", ready=READY)
            await click_start(page)
            bad_token = await closed_text(page)

            await page.goto(url, ready=READY)
            assert "fake" in await page.evaluate("document.getElementById('upstream').textContent")
            await click_start(page)
            # Answer 3 has begun (beep 4 comes about a second later): mute.
            await page.wait_for("window.relayVoiceDebug.sessions[0].debug.scheduled.length > 20")
            await page.evaluate("document.getElementById('mute').click()", gesture=True)
            with trio.fail_after(SESSION_SECONDS + 8):
                await page.wait_for("window.relayVoiceDebug.sessions[0].close")
            ended = await closed_text(page)
            debug = orjson.loads(await page.evaluate("JSON.stringify(window.relayVoiceDebug)"))
            async with httpx.AsyncClient() as http:
                upstream = (await http.get(f"{url}fake/sessions")).json()

    assert "Refused (403 origin not allowed)" in wrong_origin, wrong_origin
    assert "Refused (401 token does not decrypt): the token was refused" in bad_token, bad_token

    session = debug["sessions"][0]
    assert session["close"]["code"] == 1000
    assert session["close"]["reason"] == "session time limit"
    assert "time limit" in ended, ended

    [fake] = upstream
    assert fake["errors"] == []  # every event, truncates included, valid for the service
    # The beep went up as 24 kHz mono PCM16: read at 24 kHz it is still 440 Hz.
    assert fake["input_format"] == "audio/pcm" and fake["input_rate"] == RATE
    pcm = array.array("h", base64.b64decode(fake["input_audio"]))
    hz = zero_crossing_hz(first_beep(pcm))
    assert abs(hz - TONE_HZ) < 10, hz

    # Every item's deltas were scheduled in the order sent, back to back.
    sent: dict[str, list[str]] = {}
    for delta in fake["deltas"]:
        sent.setdefault(delta["item_id"], []).append(delta["event_id"])
    scheduled: dict[str, list[dict[str, Any]]] = {}
    for chunk in session["debug"]["scheduled"]:
        scheduled.setdefault(chunk["itemId"], []).append(chunk)
    items = list(scheduled)
    assert len(items) >= 2, scheduled
    truncated = {t["itemId"]: t for t in session["debug"]["truncates"]}
    for item in items:
        chunks = scheduled[item]
        assert [c["eventId"] for c in chunks] == sent[item][: len(chunks)]
        for a, b in itertools.pairwise(chunks):
            assert abs(b["start"] - (a["start"] + a["seconds"])) < 1e-6, (a, b)

    # Answer 1 played whole: one unbroken run of sound as long as the answer.
    first = scheduled[items[0]]
    assert items[0] not in truncated
    assert len(first) == len(sent[items[0]]) == 10
    played = rendered_run(session["rendered"], first[0]["start"])
    assert abs(played - ANSWER_SECONDS) < 0.015, played

    # Answer 2 was cut by beep 3: playback stopped, one truncate for what was heard.
    second = scheduled[items[1]]
    assert items[1] in truncated, (items, truncated)
    played_ms = rendered_run(session["rendered"], second[0]["start"]) * 1000
    assert played_ms < ANSWER_SECONDS * 1000 - 300, played_ms  # it did stop early
    [(item_id, end_ms)] = [t for t in fake["truncations"] if t[0] == items[1]]
    assert end_ms == truncated[items[1]]["audioEndMs"]
    print(f"beep read back at {hz:.1f} Hz; answer 1 rendered {played:.4f} s unbroken;")
    print(f"barge-in: rendered {played_ms:.0f} ms, truncate audio_end_ms {end_ms}")
    assert abs(end_ms - played_ms) <= 60, (end_ms, played_ms)
    received_ms = sum(d["bytes"] for d in fake["deltas"] if d["item_id"] == item_id) // 48
    assert end_ms <= received_ms
    # Exactly one truncate per barge-in, and none where nothing was cut off.
    assert len(fake["truncations"]) == len(truncated) == len(session["debug"]["truncates"]) == 1

    # Muted: beep 4 went up as silence (appends kept flowing), so the fake heard
    # three turns, and answer 3 played to its end.
    assert len(fake["speech_started"]) == 3, fake["speech_started"]
    assert session["debug"]["appendedSamples"] >= (SESSION_SECONDS - 1) * RATE
    third = scheduled[items[2]]
    assert abs(rendered_run(session["rendered"], third[0]["start"]) - ANSWER_SECONDS) < 0.015
