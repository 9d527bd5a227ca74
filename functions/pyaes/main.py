"""FunctionBench pyaes: AES-CTR encrypt and decrypt a message with the pure-Python pyaes."""
import time

import pyaes

KEY = b"\xa1\xf6%\x8c\x87}_\xcd\x89dHE8\xbf\xc9,"


def handler(event, context):
    length = int(event.get("length_of_message", 1000))
    iterations = int(event.get("num_of_iterations", 10))
    message = ("spore" * (length // 5 + 1))[:length]
    start = time.perf_counter()
    for _ in range(iterations):
        ciphertext = pyaes.AESModeOfOperationCTR(KEY).encrypt(message)
        plaintext = pyaes.AESModeOfOperationCTR(KEY).decrypt(ciphertext)
    latency = time.perf_counter() - start
    return {"ok": plaintext.decode() == message, "length": length, "latency_s": latency}
