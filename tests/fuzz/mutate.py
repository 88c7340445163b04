"""Byte mutation of real messages, in the manner of libFuzzer/atheris: flips, inserts, deletes,
duplications, truncations and splices of a seed, driven by a seeded ``random.Random`` (or by
hypothesis through ``mutations``) so every failure can be replayed.

``FUZZ`` is the fuzz tests' hypothesis settings: a modest number of examples in ``make test``;
run the suite longer with ``FUZZ_EXAMPLES=50000 make fuzz``."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CORPUS = Path(__file__).parent / "corpus"
_INTERESTING = [
    b"\r\n",
    b"\n",
    b"\x00",
    b":",
    b";",
    b",",
    b"<",
    b">",
    b"@",
    b'"',
    b"=",
    b"%",
    b"sip:",
    b"SIP/2.0",
    b"Content-Length: 99999",
    b"Content-Length: -1",
    b"CSeq: 1 ACK",
    b"Via: SIP/2.0/UDP [::1]:5060;maddr=x",
    b"To: <sip:a@b>;tag=",
    b"\xff\xfe",
    b" " * 300,
    b"a" * 1000,
    b"m=audio 0 RTP/AVP 0",
    b"c=IN IP6 ::1",
    b"c=IN IP4 999.1.1.1",
]


def seeds(kind: str = "sip") -> list[bytes]:
    """Every seed message of the corpus (SIPp captures and Asterisk-form messages)."""
    return [p.read_bytes() for p in sorted(CORPUS.rglob(f"*.{kind}"))]


def mutate(data: bytes, rng: random.Random, rounds: int = 3, pool: Sequence[bytes] = ()) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        op = rng.randrange(8)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip bits in one byte
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert an interesting token
            out[at:at] = rng.choice(_INTERESTING)
        elif op == 2 and out:  # delete a run
            out[at : at + rng.randint(1, 40)] = b""
        elif op == 3:  # duplicate a line
            lines = bytes(out).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            out = bytearray(b"\r\n".join(lines))
        elif op == 4:  # truncate
            del out[at:]
        elif op == 5 and pool:  # splice with another seed
            other = rng.choice(pool)
            cut = rng.randrange(len(other) + 1)
            out[at:] = other[cut:]
        elif op == 6:  # random bytes
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 7 and out:  # replace a byte with one of the separators
            out[rng.randrange(len(out))] = rng.choice(b":;,<>@ \r\n")
    return bytes(out)


def mutations(kind: str = "sip") -> st.SearchStrategy[bytes]:
    """Mutated seeds, as a hypothesis strategy (shrinks towards the seed)."""
    pool = seeds(kind)
    return st.builds(
        lambda seed, salt: mutate(pool[seed], random.Random(salt), pool=pool),
        st.integers(0, len(pool) - 1),
        st.integers(0, 2**32),
    )
