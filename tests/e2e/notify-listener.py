#!/usr/bin/env python3
"""A stand-in for systemd's notification socket: binds SOCK (AF_UNIX, SOCK_DGRAM),
appends every datagram it gets to OUT as one line per assignment (READY=1,
STATUS=..., MAINPID=N), flushing each, until killed.

usage: notify-listener.py SOCK OUT
"""
import os
import socket
import sys

sock_path, out_path = sys.argv[1], sys.argv[2]
try:
    os.unlink(sock_path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sock_path)
with open(out_path, "a", buffering=1) as out:
    out.write("LISTENING=1\n")
    while True:
        msg, _ = s.recvfrom(65536)
        for line in msg.decode(errors="replace").splitlines():
            out.write(line + "\n")
