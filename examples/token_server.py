"""The part of a web backend that relay needs: mint a client token per session.

    ENCRYPTION_KEY=... python examples/token_server.py --relay ws://127.0.0.1:8787

serves ``GET /token`` -> ``{"token": "..."}`` and, for a complete local setup
beside ``relay serve``, the page in ``examples/browser`` (open
http://localhost:8000/). Needs only ``cryptography``. In your own backend, put
``mint_relay_token`` behind your login: whoever can fetch a token can talk to
the model on your key until it expires.
"""

import argparse
import base64
import json
import os
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


# The README's recipe, as is.
def mint_relay_token(encryption_key: str, ttl_seconds: int = 60) -> str:
    key = base64.urlsafe_b64decode(encryption_key.replace("+", "-").replace("/", "_") + "==")
    nonce = os.urandom(12)
    claims = json.dumps({"origin": "client", "exp": int(time.time()) + ttl_seconds}).encode()
    token = nonce + AESGCM(key).encrypt(nonce, claims, None)
    return base64.urlsafe_b64encode(token).rstrip(b"=").decode()


class Handler(SimpleHTTPRequestHandler):
    relay_url = "ws://127.0.0.1:8787"

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/token":
            # A fresh token for every session: relay lets one token hold one session.
            self._json({"token": mint_relay_token(os.environ["ENCRYPTION_KEY"])})
        elif path == "/config.json":  # what the example page asks for first
            self._json({"relayUrl": self.relay_url, "fake": False, "dialect": "ga"})
        else:
            super().do_GET()

    def _json(self, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--relay", default="ws://127.0.0.1:8787", help="relay's ws(s):// URL")
    args = parser.parse_args()
    if not os.environ.get("ENCRYPTION_KEY"):
        parser.error("set ENCRYPTION_KEY (the relay's; `relay keygen` makes one)")
    Handler.relay_url = args.relay
    page = Path(__file__).resolve().parent / "browser"
    handler = partial(Handler, directory=str(page))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"open http://localhost:{server.server_address[1]}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
