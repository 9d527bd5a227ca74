"""A minimal runtime for the snapshot tests: builds some state, checkpoints itself through
libspore_checkpoint (argv[1]) on fd 3, then answers requests on fd 3, one per line."""
import ctypes
import hashlib
import json
import os
import random
import sys
import uuid

lib = ctypes.CDLL(sys.argv[1])
lib.spore_checkpoint.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
lib.spore_checkpoint_context.restype = ctypes.c_void_p

state = {"squares": [i * i for i in range(200000)], "text": "spore " * 100000}
digest = hashlib.sha256(state["text"].encode()).hexdigest()
msg = b"%d %x\n" % (os.getpid(), lib.spore_checkpoint_context())
rc = lib.spore_checkpoint(3, msg, len(msg))
if rc == 1:
    random.seed()


def send(obj):
    os.write(3, (json.dumps(obj) + "\n").encode())


send({
    "rc": rc,
    "pid": os.getpid(),
    "sum": sum(state["squares"]),
    "digest": hashlib.sha256(state["text"].encode()).hexdigest(),
    "digest_before": digest,
    "random": random.random(),
    "uuid": str(uuid.uuid4()),
})
buf = b""
while True:
    chunk = os.read(3, 4096)
    if not chunk:
        break
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        cmd = line.decode().split()
        if cmd[0] == "square":
            send({"square": int(cmd[1]) ** 2, "big": len(bytearray(int(cmd[2])))})
        elif cmd[0] == "forksum":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(w, str(sum(state["squares"])).encode())
                os._exit(0)
            os.close(w)
            total = int(os.read(r, 100))
            os.close(r)
            os.waitpid(pid, 0)
            send({"forksum": total})
        elif cmd[0] == "exit":
            sys.exit(int(cmd[1]))
