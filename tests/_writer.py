"""A writer process for the crash-safety test: appends messages to an open memory and
acknowledges each one on stdout once add_* has returned."""

import sys

from memory_plugin import ContextMemory, testing

from tests.test_persistence import message

path, seed = sys.argv[1], int(sys.argv[2])
tok = testing.tiny_tokenizer()
model = testing.tiny_llama(len(tok))
with ContextMemory.open(path, model, tokenizer=tok, config=testing.TINY_CONFIG, snapshot_every=97) as mem:
    start = len(mem.messages)
    print("READY", start, flush=True)
    for i in range(start, start + 10_000):
        role, content = message(i, seed)
        mem.add_message(role, content)
        sys.stdout.write(f"ACK {i}\n")  # one write: print() writes its pieces separately
        sys.stdout.flush()
