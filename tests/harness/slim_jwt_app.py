"""A SLIM app whose identity is the identity agent's files, used the way a user's app uses them:
SLIM's own static-JWT provider over the token file (it follows the file itself) and SLIM's own JWT
verifier over the JWKS file. Nothing here reads or checks the files.

  python slim_jwt_app.py listen NODE_ENDPOINT org/ns/name SVIDS_DIR
      prints "instance <uuid>", accepts sessions and echoes every message back.
  python slim_jwt_app.py send NODE_ENDPOINT org/ns/name SVIDS_DIR org/ns/remote SECONDS
      prints "instance <uuid>", then for SECONDS opens a new session to the remote name about
      once a second (each session handshake presents the current token and verifies the peer's),
      sends one message and prints "reply <n> <payload>" or "error <n> <text>"; exits 0.
"""
import datetime
import os
import sys
import threading
import time

import slim_bindings as slim
from slim_app import point_to_point


def identity(svids: str):
    provider = slim.IdentityProviderConfig.STATIC_JWT(
        slim.StaticJwtAuth(token_file=os.path.join(svids, "jwt_svid.token"), duration=datetime.timedelta(hours=1))
    )
    key = slim.JwtKeyConfig(
        # With a JWKS the algorithm of each key is its own `alg`; this one is only the default.
        algorithm=slim.JwtAlgorithm.ES256,
        format=slim.JwtKeyFormat.JWKS,
        key=slim.JwtKeyData.FILE(path=os.path.join(svids, "key.jwt")),
    )
    verifier = slim.IdentityVerifierConfig.JWT(
        slim.JwtAuth(
            key=slim.JwtKeyType.DECODING(key),
            audience=["slim"],
            issuer=None,
            subject=None,
            duration=datetime.timedelta(hours=1),
        )
    )
    return provider, verifier


def connect(endpoint: str, local: str, svids: str):
    service = slim.create_service("svc-" + local.replace("/", "-"))
    conn = service.connect(slim.new_insecure_client_config(endpoint))
    name = slim.Name.from_string(local)
    provider, verifier = identity(svids)
    app = service.create_app(name, provider, verifier)
    app.subscribe(name, conn)
    print("instance", app.id(), flush=True)
    return app, conn


def listen(endpoint: str, local: str, svids: str) -> None:
    app, _ = connect(endpoint, local, svids)

    def serve(session) -> None:
        while True:
            try:
                msg = session.get_message(datetime.timedelta(seconds=600))
            except Exception:  # session closed
                return
            session.publish_to(msg.context, b"echo:" + msg.payload, None, None)

    while True:
        session = app.listen_for_session(None)
        threading.Thread(target=serve, args=(session,), daemon=True).start()


def send(endpoint: str, local: str, svids: str, remote: str, seconds: float) -> int:
    app, conn = connect(endpoint, local, svids)
    remote_name = slim.Name.from_string(remote)
    app.set_route(remote_name, conn)
    config = point_to_point(max_retries=3)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        started = time.monotonic()
        try:
            session = app.create_session_and_wait(config, remote_name)
            session.publish_and_wait(f"ping {n}".encode(), None, None)
            reply = session.get_message(datetime.timedelta(seconds=5))
            print("reply", n, reply.payload.decode(), flush=True)
            app.delete_session_and_wait(session)
        except Exception as error:  # noqa: BLE001 - report whatever the bindings raise
            print("error", n, str(error).replace("\n", " "), flush=True)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    print("done", n, flush=True)
    return 0


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "listen":
        listen(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "send":
        sys.exit(send(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])))
    else:
        sys.exit(f"unknown mode {mode}")
