"""``/process_message``: the persisted start/stop switch of automatic sending (seed-compatible)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from marshmallow import Schema, fields, validate

from gateway.auth import OPTIONAL_SECURITY, SECURITY, public, require_state_change
from gateway.errors import error_responses
from gateway.httputil import invalid, json_response, read_json
from gateway.keys import STORE
from gateway.spec import docs, json_schema

COMMANDS = {"start": True, "stop": False}
COMMAND_DOC = {
    "in": "query",
    "name": "command",
    "required": False,
    "type": "string",
    "enum": list(COMMANDS),
    "description": "`start` or `stop` automatic sending; omit it to read the current state.",
}


class CommandSchema(Schema):
    command = fields.String(validate=validate.OneOf(list(COMMANDS)), metadata={"example": "stop"})


class SendingStateSchema(Schema):
    sending = fields.String(required=True, validate=validate.OneOf(["started", "stopped"]))


def _state(sending: bool) -> dict[str, str]:
    return {"sending": "started" if sending else "stopped"}


def _command(value: Any) -> bool:
    if not isinstance(value, str) or value not in COMMANDS:
        shown = value if isinstance(value, str) else repr(value)
        raise invalid("command", f"must be 'start' or 'stop', not {shown[:50]!r}", allowed=list(COMMANDS))
    return COMMANDS[value]


def _responses(with_body: bool) -> dict[str, Any]:
    return {
        "200": {
            "schema": SendingStateSchema,
            "description": "The state of automatic sending after the command (or now, without one).",
            "examples": {"application/json": {"sending": "stopped"}},
        },
        **error_responses(*((400, 401, 403, 413, 415, 422, 503) if with_body else (401, 403, 422, 503))),
    }


async def _answer(request: web.Request, command: bool | None) -> web.Response:
    store = request.app[STORE]
    if command is None:
        return json_response(_state(await store.is_sending()))
    return json_response(_state(await store.set_sending(command)))


@docs(
    tags=["dispatch"],
    summary="Start or stop automatic sending (seed-compatible GET)",
    description="With `command` this changes state, so it requires the bearer token when API_TOKEN is set; "
    "without it, it reports the current state and is open.",
    parameters=[COMMAND_DOC],
    security=OPTIONAL_SECURITY,
    responses=_responses(with_body=False),
)
async def process_message_get(request: web.Request) -> web.Response:
    command = request.query.get("command")
    if command is None:
        return await _answer(request, None)
    require_state_change(request)  # the route is public for reading the state only
    return await _answer(request, _command(command))


@docs(
    tags=["dispatch"],
    summary="Start or stop automatic sending",
    description='The command comes in the query string or in a JSON body `{"command": "start"}`; '
    "without one the current state is reported. Requires the bearer token when API_TOKEN is set.",
    parameters=[COMMAND_DOC],
    security=SECURITY,
    responses=_responses(with_body=True),
)
@json_schema(CommandSchema)
async def process_message_post(request: web.Request) -> web.Response:
    body = await read_json(request, optional=True) or {}
    query = request.query.get("command")
    if "command" in body:
        if query is not None and body["command"] != query:
            raise invalid("command", "the query string and the body disagree")
        return await _answer(request, _command(body["command"]))
    return await _answer(request, None if query is None else _command(query))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/process_message", public(process_message_get), allow_head=False)
    app.router.add_post("/process_message", process_message_post)
