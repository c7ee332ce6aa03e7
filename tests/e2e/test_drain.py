"""SIGTERM with a live client session, a live call and a webhook job in flight (issue 6)."""

from __future__ import annotations

import signal

import httpx
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.config import DEFAULT_PROMPTS
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    running_daemon,
)
from relay.testing.fake_realtime import fake_realtime
from relay.testing.fake_twilio import fake_twilio
from tests.helpers import ORIGIN, PUBLIC, call, client_url, close_of, until, wait_closed


async def test_drain_with_client_call_and_job() -> None:
    async with (
        fake_realtime() as realtime,
        fake_twilio(
            account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
        ) as twilio,
    ):
        realtime.response_chunks = 10
        twilio.chat_delay = 3.0
        twilio.chat_reply = "Happy to help."
        convo = twilio.add_conversation(
            participants=[
                "+14155550100",
                {"identity": "gateframes-bot", "projected_address": "+14082605145"},
            ],
            messages=[("+14155550100", "hello there")],
        )
        config: dict[str, dict[str, object]] = {
            "openai": {
                "realtime_url": f"ws://127.0.0.1:{realtime.port}/v1/realtime",
                "api_base": twilio.openai_base,
            },
            "twilio": {"api_base": twilio.base_url},
            "server": {"public_url": PUBLIC, "drain_seconds": 5},
        }
        async with running_daemon(config) as d, httpx.AsyncClient(base_url=d.http_url) as http:
            form = {
                "EventType": "onMessageAdded",
                "ConversationSid": convo.sid,
                "MessageSid": twilio.new_sid("IM"),  # a Twilio-shaped SID (400 else)
                "Author": "+14155550100",
                "Body": "hello there",
                "Index": "0",
            }
            signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
                PUBLIC + "/twilio/convo", form
            )
            async with (
                trio_websocket.open_websocket_url(client_url(d), extra_headers=ORIGIN) as ws,
                call(d) as phone,
            ):
                await ws.get_message()  # session.created: the client session is live
                await phone.start()
                await until(lambda: len(phone.echoed_marks) == 10)  # greeting played
                r = await http.post(
                    "/twilio/convo", data=form, headers={"X-Twilio-Signature": signature}
                )
                assert r.status_code == 200  # the job now waits 3 s on the chat endpoint
                start = trio.current_time()
                d.signal(signal.SIGTERM)
                await trio.sleep(0.2)
                assert (await http.get("/readyz")).status_code == 503
                assert (await http.get("/healthz")).status_code == 200
                try:
                    async with trio_websocket.open_websocket_url(
                        client_url(d), extra_headers=ORIGIN
                    ):
                        raise AssertionError("upgrade accepted while draining")
                except trio_websocket.ConnectionRejected as refused:
                    assert refused.status_code == 503
                # The call hears a goodbye and ends once it has played.
                await wait_closed(phone, 10)
                assert phone.close_code == 1000
                phone_upstream = realtime.connections[1]  # [0] is the browser's
                goodbye = [e for e in phone_upstream.events if e.get("type") == "response.create"][
                    -1
                ]
                assert goodbye["response"]["instructions"] == DEFAULT_PROMPTS["goodbye"]
                # The browser session is closed with 1001 when drain_seconds are up.
                assert await close_of(ws) == (1001, "server shutting down")
                assert 4.5 < trio.current_time() - start < 7
            assert await d.wait(10) == 0
        # The job in flight finished before the exit: the reply was posted as the bot.
        bot_messages = [m.body for m in convo.messages if m.author == "gateframes-bot"]
        assert bot_messages == ["Happy to help."]
