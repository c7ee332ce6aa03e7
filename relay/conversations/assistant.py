"""One chat completion: for an SMS reply, or any other short text (an ``@call`` summary).

Guarantees: one POST to ``{api_base}/chat/completions``, finished or abandoned
within ``timeout`` seconds; the reply text comes back stripped and non-empty,
or :class:`AssistantError` is raised. Error messages never contain the API key.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

__all__ = ["AssistantError", "build_messages", "chat_completion", "sms_reply"]


class AssistantError(Exception):
    """The chat completion failed; ``str(exc)`` is a short reason without secrets."""


def build_messages(
    system_prompt: str, history: list[tuple[str, str]], bot_identity: str
) -> list[dict[str, str]]:
    """The ``messages`` array: the system prompt, then ``history`` oldest first.

    The bot's own messages are ``assistant``; everyone else's are ``user``,
    prefixed with the author so the model can tell people apart in a group.
    """
    messages = [{"role": "system", "content": system_prompt}]
    for author, body in history:
        if author == bot_identity:
            messages.append({"role": "assistant", "content": body})
        else:
            messages.append({"role": "user", "content": f"{author}: {body}"})
    return messages


async def sms_reply(
    http: httpx.AsyncClient,
    *,
    api_base: str,
    api_key: str,
    model: str,
    system_prompt: str,
    history: list[tuple[str, str]],
    bot_identity: str,
    timeout: float,  # an overall deadline for the whole exchange
) -> str:
    """Ask ``model`` for the next message of the conversation and return its text."""
    return await chat_completion(
        http,
        api_base=api_base,
        api_key=api_key,
        model=model,
        messages=build_messages(system_prompt, history, bot_identity),
        timeout=timeout,
    )


async def chat_completion(
    http: httpx.AsyncClient,
    *,
    api_base: str,
    api_key: str,
    model: str,
    messages: list[dict[str, str]],
    timeout: float,  # an overall deadline for the whole exchange
) -> str:
    """Ask ``model`` to answer ``messages`` and return the answer's text."""
    payload = {"model": model, "messages": messages}
    url = api_base.rstrip("/") + "/chat/completions"
    response: httpx.Response | None = None
    # trio's deadline covers the whole exchange; httpx's timeout alone bounds
    # each read, so a server that trickles bytes could otherwise hold us forever.
    with trio.move_on_after(timeout):
        try:
            response = await http.post(
                url,
                json=payload,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            pass
        except httpx.HTTPError as exc:
            raise AssistantError(f"chat completion request failed: {type(exc).__name__}") from None
    if response is None:
        raise AssistantError(f"chat completion timed out after {timeout:g} s")
    if response.status_code >= 400:
        raise AssistantError(_describe_failure(response, api_key))
    try:
        body: Any = response.json()
        content = body["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        raise AssistantError("chat completion answer was not the expected JSON") from None
    if not isinstance(content, str) or not content.strip():
        raise AssistantError("chat completion answer was empty")
    return content.strip()


def _describe_failure(response: httpx.Response, api_key: str) -> str:
    """``HTTP <status>`` plus OpenAI's short error code when there is one.

    OpenAI's free-text error message is left out: for a bad key it quotes
    part of the key.
    """
    reason = f"chat completion failed: HTTP {response.status_code}"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, LookupError, TypeError):
        return reason
    if (
        isinstance(code, str)
        and code.isidentifier()
        and len(code) <= 64
        and (not api_key or api_key not in code)
    ):
        reason += f" ({code})"
    return reason
