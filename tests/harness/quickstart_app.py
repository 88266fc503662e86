"""The quickstart's apps (examples/05-app.yaml, 07) as real SLIM apps, configured only by the
environment the examples and the injector set: SLIM_ENDPOINT, SLIM_NAME, and either
SPIFFE_ENDPOINT_SOCKET (the agent's Workload API, set by the injector) or, without it,
SLIM_JWT_FILE / SLIM_JWKS_FILE (the agent's files).

Its first line reads the injected token file (the agent wrote it before the app started) and
prints "identity <sub>" (plus " keys <n>" with SLIM_JWKS_FILE). Then, with the socket, it connects
as SLIM_NAME with SLIM's `spire` identity on it, joins the channels it is invited to ("joined"),
says hello on each, prints what it receives and echoes it (slim_identity_app.py listen); without
it, it joins channels with the harness's shared secret (slim_member.py). Until it is stopped
(SIGTERM ends it at once).
"""
import base64
import json
import os
import signal
import threading

from slim_identity_app import listen
from slim_member import main as member


def main() -> None:
    # Exit at once on SIGTERM, as an app in a container should: as PID 1 it would otherwise be
    # left running until the grace period's SIGKILL (30 s), and a member rolled out of a channel
    # is invited under its successor only once it is gone.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with open(os.environ.get("SLIM_JWT_FILE", "/svids/jwt_svid.token")) as f:
        token = f.read().strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    line = f"identity {claims['sub']}"
    if "SLIM_JWKS_FILE" in os.environ:
        with open(os.environ["SLIM_JWKS_FILE"]) as f:
            line += f" keys {len(json.load(f)['keys'])}"
    print(line, flush=True)
    endpoint, name = os.environ["SLIM_ENDPOINT"], os.environ["SLIM_NAME"]
    if os.environ.get("SPIFFE_ENDPOINT_SOCKET"):
        os.environ.setdefault("SLIM_APP_GREETING", "hello from " + name)
        listen(endpoint, name, "spire:")
    else:
        member(endpoint, name, commands=iter(threading.Event().wait, True))


if __name__ == "__main__":
    main()
