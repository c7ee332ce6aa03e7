"""``POST /twilio/convo``: the Conversations webhook (docs/contract.md §7).

The route only decides: signature, event type, author, dedupe, per-conversation
limit. It answers ``200 ok`` at once and hands the work (Twilio REST, OpenAI)
to the server's background nursery, which the drain waits for.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

import httpx
import trio
from quart import Response
from twilio.base.exceptions import TwilioException

from relay.admission.twilio_auth import public_http_url
from relay.calls.tasks import MAX_AUTHOR_CHARS, MAX_TASK_CHARS, CallTask, TaskBook, clean_text
from relay.conversations.assistant import AssistantError, sms_reply
from relay.conversations.commands import (
    Command,
    mentions_ai,
    normalize_number,
    parse_command,
    split_targets,
)
from relay.conversations.twilio_rest import (
    TwilioRest,
    create_group,
    ensure_participant,
    list_participants,
    place_call,
    post_message,
    recent_messages,
)
from relay.daemon.state import DaemonState
from relay.edge.app import text
from relay.edge.signed_form import SignedForms

log = logging.getLogger("relay.convo")

# Twilio refuses a Conversations message longer than this; a reply cut short
# reaches the person, one refused does not.
MAX_REPLY_CHARS = 1600
# The contract has no key for the SMS reply deadline. It scales with the operator's one
# knob for patience with OpenAI, ``openai.connect_timeout_seconds``: this many
# times it for the whole exchange (30 s at the default of 10 s).
CHAT_DEADLINE_FACTOR = 3.0
HISTORY = 20
# Conversations known to have the bot; bounded so a flood of new ones cannot grow it.
KNOWN_BOT_CACHE = 10_000
# A message's position in its conversation: digits only, so that no other field
# can be run into it under the same signature (see relay.admission.twilio_auth.SID_PREFIXES).
INDEX = re.compile(r"\A[0-9]{1,12}\Z")
# Where Twilio reports a placed call's end (docs/contract.md §12).
STATUS_PATH = "/twilio/status"
# How much of a task the confirmation quotes back (the call gets all of it).
TASK_PREVIEW_CHARS = 300


class ConvoJobs:
    """The background work of one webhook event, with the clients it shares."""

    def __init__(self, rt: DaemonState, rest: TwilioRest, chat: httpx.AsyncClient) -> None:
        self.rt = rt
        self.rest = rest
        self.http = chat
        self.chat_timeout = CHAT_DEADLINE_FACTOR * rt.settings.openai.connect_timeout_seconds
        self.has_bot: set[str] = set()
        self.tasks = TaskBook(rt.store)

    async def handle(self, form: dict[str, str]) -> None:
        convo = form["ConversationSid"]
        body = form.get("Body", "")
        author = form.get("Author", "")
        s = self.rt.settings
        client = self.rest.client
        try:
            if convo not in self.has_bot:
                await ensure_participant(
                    client, convo, s.twilio.bot_identity, s.twilio.projected_address
                )
                if len(self.has_bot) >= KNOWN_BOT_CACHE:
                    self.has_bot.clear()
                self.has_bot.add(convo)
            command = parse_command(body)
            reply: str | None
            if command is not None:
                reply = await self._command(command, convo, author)
            else:
                reply = await self._ai_reply(convo, body)
            if reply:
                if len(reply) > MAX_REPLY_CHARS:
                    reply = reply[: MAX_REPLY_CHARS - 1].rstrip() + "\u2026"
                await post_message(client, convo, s.twilio.bot_identity, reply)
        except TwilioException as exc:
            self._failed("twilio", convo, f"{exc.__class__.__name__} {getattr(exc, 'status', '')}")
            return
        except AssistantError as exc:
            self._failed("openai", convo, str(exc))
            return
        except httpx.HTTPError as exc:
            self._failed("http", convo, exc.__class__.__name__)
            return
        except trio.Cancelled:
            # Only a stop (drain time up, or a second signal) cancels a job:
            # say what was abandoned.
            self._failed("cancelled", convo, "stopped before it finished")
            raise
        except Exception:
            # A bug, or an answer shaped unlike Twilio's: this event is lost, the
            # daemon is not. The traceback holds no secrets (they ride in headers).
            log.exception("conversation job crashed", extra={"conversation": convo})
            self._failed("internal", convo, "unexpected error")
            return
        self.rt.metrics.convo_events_total.labels(outcome="done").inc()

    def _failed(self, stage: str, convo: str, why: str) -> None:
        # Logged before it is counted: whoever sees the count can find the line.
        log.warning("conversation job failed at %s: %s", stage, why, extra={"conversation": convo})
        self.rt.metrics.jobs_failed_total.labels(stage=stage).inc()
        self.rt.metrics.convo_events_total.labels(outcome="failed").inc()

    async def _command(self, command: Command, convo: str, author: str) -> str:
        s = self.rt.settings
        unreadable = ", ".join(command.unreadable)
        if not command.numbers:
            note = f" I could not read: {unreadable}." if unreadable else ""
            return (
                f"Usage: @{command.kind} followed by phone numbers, "
                f"e.g. @{command.kind} 415-555-0100.{note}"
            )
        # One message may name only so many (toll fraud): the first ones, in order.
        numbers, refused = split_targets(command.numbers, s.twilio.max_call_targets)
        parts = []
        after: list[str] = []
        if command.kind == "call":
            task, cut = clean_text(command.task, MAX_TASK_CHARS)
            called: list[str] = []
            failed: list[str] = []
            status_url = public_http_url(s, STATUS_PATH)
            for number, written in zip(numbers, command.written, strict=False):
                try:
                    call_sid = await place_call(
                        self.rest.client, number, s.twilio.caller_id, s.twilio.voice_url, status_url
                    )
                    called.append(number)
                except TwilioException as exc:
                    log.warning("call failed: %s", getattr(exc, "code", ""), extra={"to": number})
                    failed.append(number)
                    continue
                if task:
                    who = clean_text(author, MAX_AUTHOR_CHARS)[0]
                    await self.tasks.remember(call_sid, CallTask(task, convo, who, written, number))
                    log.info(
                        "call placed with a task",
                        extra={"call_sid": call_sid, "to": number, "task_chars": len(task)},
                    )
            if called:
                parts.append(f"Calling {', '.join(called)}.")
            if failed:
                parts.append(f"Could not call {', '.join(failed)}.")
            if called and task:
                after.append(_task_note(task, cut, s.calls.summaries, len(called)))
            verb = "call"
        else:
            author_number = normalize_number(author)
            if author_number is None:
                return "I can start a group only from a text message sent from a phone number."
            await create_group(
                self.rest.client,
                author_address=author_number,
                numbers=[n for n in numbers if n != author_number],
                bot_identity=s.twilio.bot_identity,
                projected_address=s.twilio.projected_address,
                intro=s.twilio.intro_message,
            )
            parts.append(f"Started a group text with {', '.join(numbers)}.")
            verb = "add"
        if refused:
            limit = s.twilio.max_call_targets
            parts.append(
                f"I {verb} at most {limit} numbers per message, so not: {', '.join(refused)}."
            )
        if unreadable:
            parts.append(f"I could not read: {unreadable}.")
        return " ".join([*parts, *after])

    async def _ai_reply(self, convo: str, body: str) -> str | None:
        s = self.rt.settings
        participants = await list_participants(self.rest.client, convo)
        if len(participants) > 2 and not mentions_ai(body):
            return None
        history = await recent_messages(self.rest.client, convo, HISTORY)
        return await sms_reply(
            self.http,
            api_base=s.openai.api_base,
            api_key=s.secrets.openai_api_key or "",
            model=s.openai.chat_model,
            system_prompt=s.prompts.sms,
            history=history,
            bot_identity=s.twilio.bot_identity,
            timeout=self.chat_timeout,
        )


def _task_note(task: str, cut: bool, summaries: bool, calls: int) -> str:
    """What the confirmation says of an ``@call`` task (docs/contract.md §12)."""
    preview = task
    if len(preview) > TASK_PREVIEW_CHARS:
        preview = preview[: TASK_PREVIEW_CHARS - 1].rstrip() + "\u2026"
    note = f'The call will pursue the task: "{preview}".'
    if cut:
        note += f" (The task was cut to its first {MAX_TASK_CHARS} characters.)"
    if summaries:
        what = "what I learn" if calls == 1 else "what I learn on each call"
        note += f" I'll post {what} here."
    return note


def convo_handler(
    rt: DaemonState, forms: SignedForms, jobs: ConvoJobs
) -> Callable[[], Awaitable[Response]]:
    s = rt.settings
    counted = rt.metrics.convo_events_total

    def ok(outcome: str) -> Response:
        counted.labels(outcome=outcome).inc()
        return text("ok")

    async def handle() -> Response:
        form = await forms.read(counted)
        if isinstance(form, Response):
            return form
        if form.get("EventType") != "onMessageAdded":
            return ok("ignored_event")
        if form.get("Author") == s.twilio.bot_identity:
            return ok("ignored_bot")
        convo = form.get("ConversationSid", "")
        index = form.get("Index", "")
        if not convo or (index and not INDEX.match(index)):
            counted.labels(outcome="malformed").inc()
            return text("missing ConversationSid or malformed Index", 400)
        if not await _first_seen(rt, convo, form.get("MessageSid", ""), index):
            return ok("duplicate")
        verdict = await rt.store.take(
            f"convo:{convo}", s.limits.convo_events, s.limits.convo_window_seconds
        )
        if not verdict.allowed:
            return ok("rate_limited")

        async def job() -> None:
            await jobs.handle(form)

        if not rt.spawn_job("convo", job):
            log.warning(
                "webhook job refused: background work is at its bound",
                extra={"conversation": convo},
            )
            return ok("overloaded")
        return ok("accepted")

    return handle


async def _first_seen(rt: DaemonState, convo: str, message: str, index: str) -> bool:
    """Dedupe (docs/contract.md §7): on the MessageSid, or on ConversationSid:Index
    when there is none. A first delivery with a MessageSid also puts its
    ConversationSid:Index on record, so that a replay whose MessageSid was run into
    the field before it (same signature) still meets the position the first one
    left. Only one key is ever checked, so two deliveries racing through two
    processes cannot both find the other's key and both be dropped."""
    window = rt.settings.limits.dedupe_seconds
    position = f"dedupe:{convo}:{index}"
    if not message:
        return await rt.store.first_seen(position, window)
    fresh = await rt.store.first_seen(f"dedupe:{message}", window)
    if fresh and index:
        await rt.store.first_seen(position, window)
    return fresh
