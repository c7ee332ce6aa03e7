"""relay.conversations.assistant against the fake chat completions endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from relay.conversations.assistant import AssistantError, build_messages, sms_reply
from relay.testing.fake_twilio import FakeTwilio, fake_twilio

KEY = "sk-test-secret-key-0123456789"
BOT = "gateframes-bot"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with fake_twilio(account_sid="AC" + "0" * 32, auth_token="t", openai_key=KEY) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def ask(
    http: httpx.AsyncClient,
    fake: FakeTwilio,
    *,
    history: list[tuple[str, str]] | None = None,
    api_key: str = KEY,
    deadline: float = 5.0,
) -> str:
    return await sms_reply(
        http,
        api_base=fake.openai_base,
        api_key=api_key,
        model="gpt-4o-mini",
        system_prompt="Be brief.",
        history=history or [("+14155550100", "hi")],
        bot_identity=BOT,
        timeout=deadline,
    )


async def test_reply_is_stripped(fake: FakeTwilio, http: httpx.AsyncClient) -> None:
    fake.chat_reply = "  Sure thing!\n"
    assert await ask(http, fake) == "Sure thing!"
    (request,) = fake.chat_requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json["model"] == "gpt-4o-mini"


async def test_history_roles_and_authors(fake: FakeTwilio, http: httpx.AsyncClient) -> None:
    history = [
        ("+14155550100", "@ai what's the plan?"),
        (BOT, "Dinner at 7."),
        ("+14155550101", "@ai where?"),
    ]
    await ask(http, fake, history=history)
    assert fake.chat_requests[0].json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "+14155550100: @ai what's the plan?"},
        {"role": "assistant", "content": "Dinner at 7."},
        {"role": "user", "content": "+14155550101: @ai where?"},
    ]


def test_build_messages_empty_history() -> None:
    assert build_messages("sys", [], BOT) == [{"role": "system", "content": "sys"}]


async def test_api_base_trailing_slash(fake: FakeTwilio, http: httpx.AsyncClient) -> None:
    reply = await sms_reply(
        http,
        api_base=fake.openai_base + "/",
        api_key=KEY,
        model="m",
        system_prompt="s",
        history=[],
        bot_identity=BOT,
        timeout=5.0,
    )
    assert reply and fake.chat_requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("status", [500, 429, 400, 503])
async def test_http_error(fake: FakeTwilio, http: httpx.AsyncClient, status: int) -> None:
    fake.chat_status = status
    with pytest.raises(AssistantError, match=f"HTTP {status}"):
        await ask(http, fake)


async def test_bad_key_error_does_not_leak_the_key(
    fake: FakeTwilio, http: httpx.AsyncClient
) -> None:
    with pytest.raises(AssistantError) as info:
        await ask(http, fake, api_key="sk-wrong-key-abcdef")
    assert "HTTP 401" in str(info.value)
    assert "sk-wrong-key-abcdef" not in str(info.value)
    assert KEY not in str(info.value)


async def test_delay_beyond_timeout(fake: FakeTwilio, http: httpx.AsyncClient) -> None:
    fake.chat_delay = 5.0
    start = trio.current_time()
    with pytest.raises(AssistantError, match="timed out"):
        await ask(http, fake, deadline=0.3)
    assert trio.current_time() - start < 2.0


@pytest.mark.parametrize("reply", ["", "   \n"])
async def test_empty_reply(fake: FakeTwilio, http: httpx.AsyncClient, reply: str) -> None:
    fake.chat_reply = reply
    with pytest.raises(AssistantError, match="empty"):
        await ask(http, fake)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"choices": []}',
        b'{"choices": [{"message": {}}]}',
        b'{"choices": [{"message": {"content": 42}}]}',
        b"[]",
    ],
)
async def test_malformed_answers(body: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(AssistantError) as info:
            await sms_reply(
                client,
                api_base="http://openai.test/v1",
                api_key=KEY,
                model="m",
                system_prompt="s",
                history=[],
                bot_identity=BOT,
                timeout=5.0,
            )
    assert KEY not in str(info.value)


async def test_unreachable(http: httpx.AsyncClient) -> None:
    with pytest.raises(AssistantError, match="failed"):
        await sms_reply(
            http,
            api_base="http://127.0.0.1:1/v1",
            api_key=KEY,
            model="m",
            system_prompt="s",
            history=[],
            bot_identity=BOT,
            timeout=5.0,
        )
