"""A SLIM application used as an independent witness that routes carry messages.

  python slim_app.py listen NODE_ENDPOINT org/ns/name
      prints "instance <uuid>", accepts sessions and echoes every message back.
  python slim_app.py send NODE_ENDPOINT org/ns/name org/ns/remote MESSAGE
      prints "instance <uuid>", waits for "go" on stdin, opens a session to the remote name,
      publishes MESSAGE and prints "reply <payload>" (exit 0) or "error <text>" (exit 1).
"""
import datetime
import sys
import threading

import slim_bindings as slim

SECRET = "slim-operator-e2e-shared-secret-0123456789abcdef"


def connect(endpoint: str, local: str):
    service = slim.create_service("svc-" + local.replace("/", "-"))
    conn = service.connect(slim.new_insecure_client_config(endpoint))
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
