"""A SLIM app whose identity comes from the identity agent, used the way a user's app uses it.
Nothing here reads or checks the identity: SLIM's own providers and verifiers do.

IDENTITY is either
  spire:SOCKET  SLIM's `spire` provider and verifier on the agent's Workload API socket (its key
                travels in a `slim-claims:` audience of the JWT-SVIDs it asks for); `spire:`
                alone: the socket SPIFFE_ENDPOINT_SOCKET names (what the injector sets), or
  SVIDS_DIR     SLIM's static-JWT provider over SVIDS_DIR/jwt_svid.token and its JWT verifier
                over SVIDS_DIR/key.jwt (the agent's files).

  python slim_identity_app.py listen NODE org/ns/name IDENTITY
      prints "instance <uuid>"; accepts sessions (point-to-point and group), prints
      "joined <n>" for each, "received <payload>" for each message and echoes it back (not an
      echo); "publish <text>" on stdin publishes on the last session joined; with
      SLIM_APP_GREETING set, publishes it on every session it joins, every 2 s for a minute (so
      members that join later hear it too).
  python slim_identity_app.py send NODE org/ns/name IDENTITY org/ns/remote SECONDS
      for SECONDS, opens a new point-to-point session about once a second, sends one message and
      prints "reply <n> <payload>" or "error <n> <text>"; then "done <n>".
  python slim_identity_app.py groups NODE org/ns/name IDENTITY org/ns/channel MEMBERS SECONDS MLS
      for SECONDS, every 2 s a new group session (MLS when MLS is "mls"), the members
      (comma-separated names) invited, one message published, every member's echo awaited:
      "group <n> ok" or "group <n> error <text>"; then "done <n>".
  python slim_identity_app.py channel NODE org/ns/name IDENTITY org/ns/channel MEMBERS SECONDS MLS
      ONE group session for SECONDS: a message every second, "message <n> echoes <k>" with the
      echoes that came back within 2 s; then "done <n>".
"""
import datetime
import os
import sys
import threading
import time

import slim_bindings as slim
from slim_app import point_to_point


def identity(spec: str):
    if spec.startswith("spire:"):
        config = slim.SpireConfig(
            socket_path=spec[len("spire:"):] or None, target_spiffe_id=None, jwt_audiences=["slim"], trust_domains=[]
        )
        return slim.IdentityProviderConfig.SPIRE(config), slim.IdentityVerifierConfig.SPIRE(config)
    provider = slim.IdentityProviderConfig.STATIC_JWT(
        slim.StaticJwtAuth(token_file=os.path.join(spec, "jwt_svid.token"), duration=datetime.timedelta(hours=1))
    )
    key = slim.JwtKeyConfig(
        # With a JWKS the algorithm of each key is its own `alg`; this one is only the default.
        algorithm=slim.JwtAlgorithm.ES256,
        format=slim.JwtKeyFormat.JWKS,
        key=slim.JwtKeyData.FILE(path=os.path.join(spec, "key.jwt")),
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


def connect(endpoint: str, local: str, spec: str):
    service = slim.create_service("svc-" + local.replace("/", "-"))
    conn = service.connect(slim.new_insecure_client_config(endpoint))
    name = slim.Name.from_string(local)
    provider, verifier = identity(spec)
    app = service.create_app(name, provider, verifier)
    app.subscribe(name, conn)
    print("instance", app.id(), flush=True)
    return app, conn


def one_line(error) -> str:
    return str(error).replace("\n", " ")


def greet(session, text: str) -> None:
    for _ in range(30):
        time.sleep(2.0)
        try:
            session.publish_and_wait(text.encode(), None, None)
            print("published", text, flush=True)
        except Exception as error:  # noqa: BLE001
            print("error", one_line(error), flush=True)


def listen(endpoint: str, local: str, spec: str) -> None:
    app, _ = connect(endpoint, local, spec)
    sessions = []

    def serve(session) -> None:
        while True:
            try:
                msg = session.get_message(datetime.timedelta(seconds=600))
            except Exception:  # session closed
                return
            payload = msg.payload.decode()
            print("received", payload, flush=True)
            if payload.startswith("echo:"):
                continue
            try:
                session.publish_to(msg.context, b"echo:" + msg.payload, None, None)
            except Exception as error:  # noqa: BLE001 - a refused reply is the test's to see
                print("echo-error", one_line(error), flush=True)

    greeting = os.environ.get("SLIM_APP_GREETING")

    def accept() -> None:
        while True:
            session = app.listen_for_session(None)
            sessions.append(session)
            print("joined", len(sessions), flush=True)
            threading.Thread(target=serve, args=(session,), daemon=True).start()
            if greeting:
                threading.Thread(target=greet, args=(session, greeting), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    for line in sys.stdin:
        command, _, text = line.strip().partition(" ")
        if command == "publish" and sessions:
            try:
                sessions[-1].publish_and_wait(text.encode(), None, None)
                print("published", text, flush=True)
            except Exception as error:  # noqa: BLE001
                print("error", one_line(error), flush=True)
    threading.Event().wait()


def paced(seconds: float, period: float, step) -> int:
    """Runs step(n) for n = 1, 2, ... at most once per `period` until `seconds` have passed, then
    prints "done <n>"."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        started = time.monotonic()
        step(n)
        time.sleep(max(0.0, period - (time.monotonic() - started)))
    print("done", n, flush=True)
    return 0


def send(endpoint: str, local: str, spec: str, remote: str, seconds: float) -> int:
    app, conn = connect(endpoint, local, spec)
    remote_name = slim.Name.from_string(remote)
    app.set_route(remote_name, conn)
    config = point_to_point(max_retries=3)

    def session(n: int) -> None:
        try:
            session = app.create_session_and_wait(config, remote_name)
            session.publish_and_wait(f"ping {n}".encode(), None, None)
            reply = session.get_message(datetime.timedelta(seconds=5))
            print("reply", n, reply.payload.decode(), flush=True)
            app.delete_session_and_wait(session)
        except Exception as error:  # noqa: BLE001 - report whatever the bindings raise
            print("error", n, one_line(error), flush=True)

    return paced(seconds, 1.0, session)


def group_config(mls: bool):
    return slim.SessionConfig(
        session_type=slim.SessionType.GROUP,
        max_retries=5,
        interval=datetime.timedelta(milliseconds=500),
        metadata={},
        mls_settings=slim.MlsSettings(header_integrity_validation_percent=100, max_seen_control_message_ids_size=None)
        if mls
        else None,
    )


def open_group(app, conn, channel: str, members, mls: bool):
    for member in members:
        app.set_route(slim.Name.from_string(member), conn)
    session = app.create_session_and_wait(group_config(mls), slim.Name.from_string(channel))
    for member in members:
        session.invite_and_wait(slim.Name.from_string(member))
    return session


def echoes(session, text: str, expected: int, timeout: float) -> int:
    """Publishes `text` and counts the members' echoes of it within `timeout` seconds (a publish
    that never completes counts as none)."""
    deadline = time.monotonic() + timeout
    publish = threading.Thread(target=session.publish_and_wait, args=(text.encode(), None, None), daemon=True)
    publish.start()
    publish.join(timeout)
    if publish.is_alive():
        return 0
    got = 0
    while got < expected and time.monotonic() < deadline:
        try:
            msg = session.get_message(datetime.timedelta(seconds=max(0.05, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - nothing more within the time
            break
        if msg.payload.decode() == "echo:" + text:
            got += 1
    return got


def groups(endpoint, local, spec, channel, members, seconds, mls) -> int:
    app, conn = connect(endpoint, local, spec)

    def group(n: int) -> None:
        try:
            session = open_group(app, conn, f"{channel}-{n}", members, mls)
            got = echoes(session, f"group {n}", len(members), 5.0)
            if got == len(members):
                print("group", n, "ok", flush=True)
            else:
                print("group", n, "error", f"{got} of {len(members)} echoes", flush=True)
            app.delete_session_and_wait(session)
        except Exception as error:  # noqa: BLE001
            print("group", n, "error", one_line(error), flush=True)

    return paced(seconds, 2.0, group)


def channel(endpoint, local, spec, name, members, seconds, mls) -> int:
    app, conn = connect(endpoint, local, spec)
    session = open_group(app, conn, name, members, mls)
    print("opened", flush=True)

    def message(n: int) -> None:
        try:
            print("message", n, "echoes", echoes(session, f"message {n}", len(members), 2.0), flush=True)
        except Exception as error:  # noqa: BLE001
            print("message", n, "error", one_line(error), flush=True)

    return paced(seconds, 1.0, message)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "listen":
        listen(args[0], args[1], args[2])
    elif mode == "send":
        sys.exit(send(args[0], args[1], args[2], args[3], float(args[4])))
    elif mode in ("groups", "channel"):
        run = groups if mode == "groups" else channel
        sys.exit(run(args[0], args[1], args[2], args[3], args[4].split(","), float(args[5]), args[6] == "mls"))
    else:
        sys.exit(f"unknown mode {mode}")
