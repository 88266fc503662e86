"""The quickstart's app (examples/05-app.yaml) as a real SLIM app, configured only by the
environment the example sets: SLIM_ENDPOINT, SLIM_NAME, SLIM_JWT_FILE, SLIM_JWKS_FILE.

Its first line reads the injected identity files (the agent wrote them before the app started) and
prints "identity <sub> keys <n>"; then it connects as SLIM_NAME and joins the channels it is
invited to, printing "joined" (slim_member.py), until it is stopped.
"""
import base64
import json
import os
import threading

from slim_member import main as member


def main() -> None:
    with open(os.environ["SLIM_JWT_FILE"]) as f:
        token = f.read().strip()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    with open(os.environ["SLIM_JWKS_FILE"]) as f:
        keys = json.load(f)["keys"]
    print("identity", claims["sub"], "keys", len(keys), flush=True)
    forever = iter(threading.Event().wait, True)
    member(os.environ["SLIM_ENDPOINT"], os.environ["SLIM_NAME"], commands=forever)


if __name__ == "__main__":
    main()
