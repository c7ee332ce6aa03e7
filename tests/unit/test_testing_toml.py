"""relay.testing.daemon.toml_dumps: what it writes reads back as the same config."""

from __future__ import annotations

import tomllib
from typing import Any

from relay.testing.daemon import daemon_config, toml_dumps


def test_calls_section_round_trips() -> None:
    schema = {
        "type": "object",
        "properties": {"order": {"type": "string", "description": 'say "42"\nplease'}},
        "required": ["order"],
        "additionalProperties": False,
    }
    config: dict[str, dict[str, Any]] = daemon_config(
        {
            "calls": {
                "tools": ["end_call", "transfer_call"],
                "transfer_targets": {"front_desk": "+14155550100", "odd key": "+14155550101"},
                "http_tools": [
                    {
                        "name": "lookup_order",
                        "url": "http://127.0.0.1:1/t",
                        "parameters": schema,
                        "timeout_seconds": 1.5,
                    },
                ],
                "transcripts": True,
                "events_url": "",
            }
        }
    )
    assert tomllib.loads(toml_dumps(config)) == config
    assert tomllib.loads(toml_dumps({"calls": {"transfer_targets": {}, "tools": []}})) == {
        "calls": {"transfer_targets": {}, "tools": []}
    }
