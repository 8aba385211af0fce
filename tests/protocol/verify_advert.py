#!/usr/bin/env python3
"""Decode and verify a Hearth capacity advert, written from docs/protocol.md alone.

Usage: verify_advert.py AUTHOR_PEER_ID NOW_UNIX_SECONDS < message
Prints "ok SEQ STATE CPU_MILLIS" and exits 0 for a valid advert; prints the reason and exits 1
otherwise.

Or: verify_advert.py --offers NOW_UNIX_SECONDS < offers.json
Checks each offer of an agent's listing (`GET /api/v1/offers`, `hearth offers --json`) as
"Checking an offer an agent shows you" says: its `signed` message verifies for its `peer_id`, and
every other field of the offer equals that member of the signed advert. Prints one line per offer,
"ok PEER_ID SEQ" or "PEER_ID: REASON", and exits 1 if any offer fails.
Only the Python standard library: base58, the libp2p key encoding and Ed25519 (RFC 8032) are
implemented here, so nothing of Hearth's own code or its libraries is trusted.
"""

import hashlib
import json
import sys

TAG = b"hearth/advert/v1"
MAX_BYTES = 16384
MAX_SKEW = 60
MAX_LIFETIME = 3600

# --- Ed25519 verification, after RFC 8032 section 6 -------------------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _add(p, q):
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _equal(p, q):
    x1, y1, z1, _ = p
    x2, y2, z2, _ = q
    return (x1 * z2 - x2 * z1) % P == 0 and (y1 * z2 - y2 * z1) % P == 0


def _recover_x(y, sign):
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P)
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P != 0:
        return None
    if (x & 1) != sign:
        x = P - x
    return x


def _decompress(s):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % P)


G_Y = 4 * pow(5, P - 2, P) % P
G = (_recover_x(G_Y, 0), G_Y, 1, _recover_x(G_Y, 0) * G_Y % P)


def ed25519_verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decompress(public)
    r = _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % L
    return _equal(_mul(s, G), _add(r, _mul(h, a)))


# --- Peer ids ------------------------------------------------------------------------------------

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58_decode(text):
    n = 0
    for ch in text:
        n = n * 58 + ALPHABET.index(ch)
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + body


def ed25519_key_of(peer_id):
    """The 32-byte key inside an identity-multihash peer id, or None."""
    raw = base58_decode(peer_id)
    # Multihash: code 0x00 (identity), one-byte length, then the protobuf PublicKey:
    # field 1 KeyType (varint, Ed25519 = 1), field 2 Data (32 bytes).
    if len(raw) < 2 or raw[0] != 0x00 or raw[1] != len(raw) - 2:
        return None
    key = raw[2:]
    if key[:4] != b"\x08\x01\x12\x20" or len(key) != 36:
        return None
    return key[4:]


# --- The advert ----------------------------------------------------------------------------------

def canonical(value):
    """RFC 8785 for values without fractions (all an advert holds)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def verify(data, author, now):
    if len(data) > MAX_BYTES:
        return "oversized"
    try:
        message = json.loads(data.decode("utf-8"))
    except ValueError:
        return "malformed"
    if not isinstance(message, dict) or "advert" not in message or not isinstance(message.get("signature"), str):
        return "malformed"
    body = message["advert"]
    if not isinstance(body, dict) or body.get("version") != 1:
        return "version"
    for key, kind in [("peer_id", str), ("seq", int), ("issued_at", int), ("expires_at", int), ("state", str)]:
        if not isinstance(body.get(key), kind):
            return "malformed"
    if body["peer_id"] != author:
        return "wrong peer"
    public = ed25519_key_of(body["peer_id"])
    try:
        signature = bytes.fromhex(message["signature"])
    except ValueError:
        return "bad signature"
    if public is None or not ed25519_verify(public, TAG + canonical(body), signature):
        return "bad signature"
    if body["expires_at"] <= now:
        return "expired"
    if body["issued_at"] > now + MAX_SKEW or body["expires_at"] - body["issued_at"] > MAX_LIFETIME:
        return "from the future"
    return None


def check_offers(offers, now):
    """One line per offer, and whether all of them hold."""
    lines, good = [], True
    for offer in offers:
        peer = offer.get("peer_id") if isinstance(offer, dict) else None
        signed = offer.get("signed") if isinstance(offer, dict) else None
        if not isinstance(peer, str) or not isinstance(signed, str):
            lines.append(f"{peer}: no signed advert")
            good = False
            continue
        data = signed.encode("utf-8")
        problem = verify(data, peer, now)
        if problem is None:
            body = json.loads(data)["advert"]
            shown = {key: value for key, value in offer.items() if key != "signed"}
            if any(key not in body or body[key] != value for key, value in shown.items()):
                problem = "the fields shown differ from the signed advert"
        if problem:
            lines.append(f"{peer}: {problem}")
            good = False
        else:
            lines.append(f"ok {peer} {body['seq']}")
    return lines, good


def main():
    if sys.argv[1] == "--offers":
        lines, good = check_offers(json.loads(sys.stdin.buffer.read()), int(sys.argv[2]))
        print("\n".join(lines))
        sys.exit(0 if good else 1)
    author, now = sys.argv[1], int(sys.argv[2])
    data = sys.stdin.buffer.read()
    problem = verify(data, author, now)
    if problem:
        print(problem)
        sys.exit(1)
    body = json.loads(data)["advert"]
    print("ok", body["seq"], body["state"], body["free"]["cpu_millis"])


if __name__ == "__main__":
    main()
