"""A process that tries what an intruder would against a running local cluster (tests/test_auth_cluster.py).

    python tests/auth_probe.py MODE < {"controller": ..., "link": ..., "aw_link": ..., "kv_store": ...}

MODE "right" holds the cluster secret (inherited) and should get everything; "wrong" holds another
secret; "none" holds none and sends no credential at all. Prints one JSON object: for each attempt
(register, admin, link to an expert worker, aw_link to an attention worker as a frontend would, kv_store)
"ok" or the error it got.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import grpc

from resilient_moe import auth
from resilient_moe.controller.client import ControllerClient, worker_info
from resilient_moe.datapath import handshake
from resilient_moe.datapath.frames import worker_number
from resilient_moe.datapath.dial import connect
from resilient_moe.datapath.link import PeerInfo
from resilient_moe.kvstore import memory_layout as store
from resilient_moe.proto import controller_pb2 as pb
from resilient_moe.proto import controller_pb2_grpc as pb_grpc

PROBE = "auth-probe"


def stub(where: dict, mode: str):
    if mode == "none":  # no interceptor: calls carry no credential
        return pb_grpc.ControllerStub(grpc.insecure_channel(where["controller"]))
    return ControllerClient(where["controller"]).stub


def register(where: dict, mode: str) -> None:
    controller = stub(where, mode)
    if mode == "right":  # a harmless name, gone again at once
        reply = controller.Register(pb.RegisterRequest(worker=worker_info(PROBE, pb.FRONTEND, 0)), timeout=5)
        controller.Deregister(pb.Fence(name=PROBE, incarnation=reply.incarnation), timeout=5)
    else:  # the attack: take over a real worker's name, which fences it
        controller.Register(pb.RegisterRequest(worker=worker_info("aw-0", pb.ATTENTION, 0)), timeout=5)


def admin(where: dict, mode: str) -> None:
    update = pb.FaultUpdate() if mode == "right" else pb.FaultUpdate(
        add=[pb.Fault(id="probe", kind="drop", drop_rate=1.0, token_id=-1)])
    stub(where, mode).SetFaults(update, timeout=5)


def send_no_link_credential() -> None:
    """Make every HELLO this process sends go without "auth"."""
    blank = auth.Credential(0.0, "", "")
    make = handshake.hello_frame
    handshake.link_credential = lambda identity, to: blank
    handshake.hello_frame = lambda *a, **kw: make(*a, **{k: v for k, v in kw.items() if k != "auth"})


def link(where: dict, mode: str, key: str = "link", to: str = "ew-0") -> None:
    identity = PeerInfo(PROBE, worker_number("frontend", 99), 1, os.getpid())
    connect(where[key], identity, timeout=5, to=to).close()


def aw_link(where: dict, mode: str) -> None:
    link(where, mode, "aw_link", "aw-0")


def kv_store(where: dict, mode: str) -> None:
    if mode != "none":
        fd, _ = store.fetch_store_fd(where["kv_store"], PROBE)
        os.close(fd)
        return
    name, _ = store.parse_address(where["kv_store"])  # a request without "auth"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        sock.connect("\0" + name[1:])
        sock.send(json.dumps({"who": PROBE}).encode())
        data, fds, _, _ = socket.recv_fds(sock, 1 << 14, 1)
    for fd in fds:
        os.close(fd)
    reply = json.loads(data)
    if "error" in reply:
        raise auth.AuthError(reply["error"])
    if not fds:
        raise ValueError("no fd")


def attempt(action, where: dict, mode: str) -> str:
    try:
        action(where, mode)
        return "ok"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    except Exception as e:  # what the intruder got is the result
        return f"{type(e).__name__}: {e}"


def main() -> int:
    mode = sys.argv[1]
    where = json.loads(sys.stdin.read())
    if mode == "wrong":
        auth.install(auth.new_secret())
    elif mode == "none":
        if auth.has_secret():
            raise SystemExit("mode none must run without the cluster secret in its environment")
        send_no_link_credential()
    result = {name: attempt(action, where, mode) for name, action in
              (("register", register), ("admin", admin), ("link", link), ("aw_link", aw_link), ("kv_store", kv_store))}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
