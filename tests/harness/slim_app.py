"""A SLIM application used as an independent witness that routes carry messages.

  python slim_app.py listen NODE_ENDPOINT org/ns/name
      prints "instance <uuid>", accepts sessions and echoes every message back.
  python slim_app.py send NODE_ENDPOINT org/ns/name org/ns/remote MESSAGE
      prints "instance <uuid>", waits for "go" on stdin, opens a session to the remote name,
      publishes MESSAGE and prints "reply <payload>" (exit 0) or "error <text>" (exit 1).

With SLIM_APP_TOKEN_FILE set, the app authenticates to its node with that token file (SLIM's
static-JWT client auth, which reloads the file when it changes); a refused connection prints
"refused <text>" and exits 3 (after SLIM_APP_CONNECT_ATTEMPTS tries 250 ms apart, when set).
"""
import datetime
import os
import sys
import threading

import slim_bindings as slim

SECRET = "slim-operator-e2e-shared-secret-0123456789abcdef"


def client_config(endpoint: str):
    config = slim.new_insecure_client_config(endpoint)
    token_file = os.environ.get("SLIM_APP_TOKEN_FILE")
    if token_file:
        config.auth = slim.ClientAuthenticationConfig.STATIC_JWT(
            slim.StaticJwtAuth(token_file=token_file, duration=datetime.timedelta(hours=1))
        )
    attempts = os.environ.get("SLIM_APP_CONNECT_ATTEMPTS")
    if attempts:
        config.backoff = slim.BackoffConfig.FIXED_INTERVAL(
            slim.FixedIntervalBackoff(interval=datetime.timedelta(milliseconds=250), max_attempts=int(attempts))
        )
    return config


def connect(endpoint: str, local: str):
    service = slim.create_service("svc-" + local.replace("/", "-"))
    try:
        conn = service.connect(client_config(endpoint))
    except Exception as error:  # noqa: BLE001 - the node refused us
        print("refused", error, flush=True)
        os._exit(3)  # SLIM's runtime threads would keep a plain exit waiting
    name = slim.Name.from_string(local)
    app = service.create_app_with_secret(name, SECRET)
    app.subscribe(name, conn)
    print("instance", app.id(), flush=True)
    return app, conn


def point_to_point(max_retries: int):
    """A point-to-point session without MLS, retried every 500 ms."""
    return slim.SessionConfig(
        session_type=slim.SessionType.POINT_TO_POINT,
        max_retries=max_retries,
        interval=datetime.timedelta(milliseconds=500),
        metadata={},
        mls_settings=None,
    )


def listen(endpoint: str, local: str) -> None:
    app, _ = connect(endpoint, local)

    def serve(session) -> None:
        while True:
            try:
                msg = session.get_message(datetime.timedelta(seconds=600))
            except Exception:  # session closed
                return
            print("received", msg.payload.decode(), flush=True)
            session.publish_to(msg.context, b"echo:" + msg.payload, None, None)

    while True:
        session = app.listen_for_session(None)
        print("session", flush=True)
        threading.Thread(target=serve, args=(session,), daemon=True).start()


def send(endpoint: str, local: str, remote: str, message: str) -> int:
    app, conn = connect(endpoint, local)
    sys.stdin.readline()  # the test says "go" once routes are in place
    remote_name = slim.Name.from_string(remote)
    app.set_route(remote_name, conn)
    config = point_to_point(max_retries=5)
    try:
        session = app.create_session_and_wait(config, remote_name)
        session.publish_and_wait(message.encode(), None, None)
        reply = session.get_message(datetime.timedelta(seconds=15))
        print("reply", reply.payload.decode(), flush=True)
        return 0
    except Exception as error:  # noqa: BLE001 - report whatever the bindings raise
        print("error", error, flush=True)
        return 1


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "listen":
        listen(sys.argv[2], sys.argv[3])
    elif mode == "send":
        sys.exit(send(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]))
    else:
        sys.exit(f"unknown mode {mode}")
