#!/usr/bin/python3
# Minimal L1 command agent used by selftest.sh (installed as start-agent on the
# source disk).  Speaks JSON lines on the virtio-serial port org.vmbeam.agent:
#   host -> {"id": n, "cmd": "<sh command>" | "argv": [...], "timeout": s}
#   L1   -> {"id": n, "rc": rc, "out": "<stdout+stderr>"}
# Not the project's agent: just enough to drive the nested-path proof.
import json, os, subprocess, time

PORT = "/dev/virtio-ports/org.vmbeam.agent"

def main():
    fd = os.open(PORT, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:           # host side not connected: EOF until it is
            time.sleep(0.2)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            try:
                argv = req["argv"] if "argv" in req else ["/bin/sh", "-c", req["cmd"]]
                p = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=req.get("timeout", 120))
                rep = {"id": req.get("id"), "rc": p.returncode, "out": p.stdout.decode(errors="replace")}
            except Exception as e:     # timeout, bad argv...: report, keep serving
                rep = {"id": req.get("id"), "rc": -1, "out": f"{type(e).__name__}: {e}"}
            data = json.dumps(rep).encode() + b"\n"
            while data:
                data = data[os.write(fd, data):]

main()
