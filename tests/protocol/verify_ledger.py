#!/usr/bin/env python3
"""Verify an exported Hearth ledger, written from docs/ledger.md (and docs/protocol.md) alone.

Usage: verify_ledger.py EXPORT.jsonl [--checkpoint CHECKPOINT.json]...

EXPORT is the JSON Lines export (`hearth ledger export --format jsonl`); each CHECKPOINT holds one
signed checkpoint `{"body": {...}, "signature": "..."}` that a witness kept.

Prints `ok ROWS RECEIPTS HEAD` (HEAD: the last row's hash, `-` for an empty ledger) and exits 0
when every row passes the steps of "Verification" and no checkpoint signed by the owner
contradicts the chain; prints `broken at row N: REASON` for the first bad row and exits 1; prints
`error: ...` on stderr and exits 2 when the input is not an export (or a checkpoint file is not a
checkpoint). A checkpoint that is not the owner's proves nothing: it is reported on stderr as a
note and otherwise ignored.

Where docs/ledger.md leaves a choice open, this verifier is strict about what no hash or signature
covers and lenient about what one does: a row must have exactly its six fields, each line must be
one JSON object ending in a newline, no object may repeat a key, and every number must be an
integer; but signed documents, agreements, receipts and checkpoints may carry fields beyond the
ones the document lists (they are signed, or covered by the row's hash). The row named for a seq
that goes backwards is the position where it appeared (the row number that was expected there).

Only the Python standard library. Ed25519, base58 and the libp2p key decoding come from
verify_advert.py beside this file; canonical JSON (RFC 8785 for integers-only values) is
implemented here, and every body is re-canonicalised from what was parsed, never taken as written.
"""

import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from verify_advert import ed25519_key_of, ed25519_verify  # noqa: E402

ZEROS = "0" * 64
KINDS = ("request", "offer", "agreement", "transfer", "notice", "release", "receipt", "reservation")
ROW_FIELDS = {"seq", "at", "kind", "body", "prev", "hash"}
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX128 = re.compile(r"[0-9a-f]{128}")

TAG_REQUEST = b"hearth/request/v1"
TAG_AGREEMENT = b"hearth/agreement/v1"
TAG_NOTICE = b"hearth/notice/v1"
TAG_RECEIPT = b"hearth/receipt/v1"
TAG_CHECKPOINT = b"hearth/checkpoint/v1"
TAG_RESERVE = b"hearth/reserve/v1"
TAG_RESERVATION = b"hearth/reservation/v1"
TAG_RELEASE = b"hearth/release/v1"

# A reservation record's event: the tag its document is signed under and the signer's field.
RESERVATION_EVENTS = {
    "reserve": (TAG_RESERVE, "consumer"),
    "granted": (TAG_RESERVATION, "provider"),
    "released": (TAG_RELEASE, "consumer"),
}


class Malformed(Exception):
    """The input is not an export (or not a checkpoint): exit 2."""


class Bad(Exception):
    """The row at hand is bad: the reason."""


# --- JSON in, canonical JSON out -----------------------------------------------------------------


class NotInteger:
    """A number with a fraction or an exponent (or NaN/Infinity): never canonical here."""

    def __init__(self, text):
        self.text = text


class DuplicateKey(Exception):
    pass


def _object(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def parse(text):
    """JSON as docs/protocol.md allows it: numbers that are not integers are kept as markers."""
    return json.loads(text, object_pairs_hook=_object, parse_float=NotInteger, parse_constant=NotInteger)


_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(s):
    out = ['"']
    for ch in s:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ord(ch) < 0x20:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _jcs(value, out):
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _jcs(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        # RFC 8785: members sorted by their keys' UTF-16 code units.
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _jcs(value[key], out)
        out.append("}")
    elif isinstance(value, NotInteger):
        raise Bad(f"the number {value.text} is not an integer, so it has no canonical form here")
    else:
        raise Bad(f"cannot canonicalise {value!r}")


def jcs(value):
    """RFC 8785 canonical bytes of an integers-only JSON value."""
    out = []
    _jcs(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise Bad("a string holds a lone surrogate, which has no UTF-8 form") from None


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


# --- Signed documents ----------------------------------------------------------------------------


def peer_key(peer_id):
    """The Ed25519 key a peer id embeds, or None when it is not such a peer id."""
    if not isinstance(peer_id, str) or not peer_id:
        return None
    try:
        return ed25519_key_of(peer_id)
    except ValueError:  # a character outside the base58 alphabet
        return None


_verified = {}


def signature_holds(tag, body, signature, signer):
    """Whether `signature` (hex) is `signer`'s (a peer id) over tag ‖ JCS(body)."""
    key = peer_key(signer)
    if key is None:
        raise Bad(f"{signer!r} is not an Ed25519 peer id")
    message = tag + jcs(body)
    cache_key = (key, message, signature)
    if cache_key not in _verified:
        _verified[cache_key] = ed25519_verify(key, message, bytes.fromhex(signature))
    return _verified[cache_key]


def has_keys(value, keys, what):
    """`value` is an object with every one of `keys` (others may follow them, as protocol.md lets
    later versions add fields; in a row's body they are covered by the row's hash)."""
    if not isinstance(value, dict):
        raise Bad(f"{what} is not a JSON object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise Bad(f"{what} has no {', '.join(missing)}")


def hex_signature(value, what):
    if not isinstance(value, str) or not HEX128.fullmatch(value):
        raise Bad(f"{what} is not 128 lowercase hex digits")
    return value


def version_1(body, what):
    if not isinstance(body, dict):
        raise Bad(f"{what} is not a JSON object")
    if not (is_int(body.get("version")) and body["version"] == 1):
        raise Bad(f"{what} has version {body.get('version')!r}, not 1")


def names_owner(body, owner, what):
    if owner not in (body.get("consumer"), body.get("provider")):
        raise Bad(f"{what} names the owner {owner} as neither its consumer nor its provider")


def check_signed(tag, body, signature, signer_field, what):
    signer = body.get(signer_field)
    if peer_key(signer) is None:
        raise Bad(f"{what}'s {signer_field} {signer!r} is not an Ed25519 peer id")
    if not signature_holds(tag, body, signature, signer):
        raise Bad(f"{what}'s signature by its {signer_field} {signer} does not verify under {tag.decode()}")


def signed_document(record, tag, signer_field, what, owner):
    """A record that is `{"body": BODY, "signature": HEX}` signed by BODY[signer_field]."""
    has_keys(record, ("body", "signature"), f"the {what}")
    version_1(record["body"], f"the {what}'s body")
    hex_signature(record["signature"], f"the {what}'s signature")
    check_signed(tag, record["body"], record["signature"], signer_field, f"the {what}")
    names_owner(record["body"], owner, f"the {what}")


def doubly_signed(record, inner, tag, what, owner):
    """A record that is `{INNER: BODY, "provider_signature": HEX, "consumer_signature": HEX}`."""
    has_keys(record, (inner, "provider_signature", "consumer_signature"), f"the {what}")
    body = record[inner]
    version_1(body, f"the {what}'s {inner}")
    for party in ("provider", "consumer"):
        signature = hex_signature(record[f"{party}_signature"], f"the {what}'s {party}_signature")
        check_signed(tag, body, signature, party, f"the {what}")
    names_owner(body, owner, f"the {what}")


def names_agreement(record, what):
    if not isinstance(record, dict):
        raise Bad(f"the {what} body is not a JSON object")
    agreement_id = record.get("agreement_id")
    if not isinstance(agreement_id, str) or not agreement_id:
        raise Bad(f"the {what} names no agreement_id")


def check_kind(kind, body, owner):
    """Step 4: the signatures the kind carries, and the owner as a party."""
    if kind == "request":
        signed_document(body, TAG_REQUEST, "consumer", "request", owner)
    elif kind == "offer":
        signed_document(body, TAG_AGREEMENT, "provider", "offer", owner)
    elif kind == "notice":
        signed_document(body, TAG_NOTICE, "provider", "notice", owner)
    elif kind == "agreement":
        doubly_signed(body, "terms", TAG_AGREEMENT, "agreement", owner)
    elif kind == "receipt":
        doubly_signed(body, "receipt", TAG_RECEIPT, "receipt", owner)
    elif kind in ("transfer", "release"):
        names_agreement(body, kind)
    elif kind == "reservation":
        reservation(body, owner)


def reservation(record, owner):
    """A reservation record: a signed document of its event, or the provider's note that one lapsed."""
    if not isinstance(record, dict):
        raise Bad("the reservation body is not a JSON object")
    event = record.get("event")
    if event == "lapsed":
        if not isinstance(record.get("reservation_id"), str):
            raise Bad("a lapsed reservation names no reservation_id")
        return
    if event not in RESERVATION_EVENTS:
        raise Bad(f"a reservation event {event!r} of no known kind")
    tag, signer = RESERVATION_EVENTS[event]
    if "document" not in record:
        raise Bad("a reservation record with no document")
    signed_document(record["document"], tag, signer, f"reservation {event}", owner)


# --- The export ----------------------------------------------------------------------------------


def read_lines(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Malformed(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise Malformed(f"{path} is empty, not an export")
    if not data.endswith(b"\n"):
        raise Malformed(f"{path} does not end with a newline (cut off?)")
    lines = data[:-1].split(b"\n")
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"line {number} is not UTF-8") from None
        try:
            value = parse(text)
        except DuplicateKey as dup:
            value = DuplicateKey(str(dup))
        except (ValueError, RecursionError):
            raise Malformed(f"line {number} is not JSON") from None
        if not isinstance(value, (dict, DuplicateKey)):
            raise Malformed(f"line {number} is not a JSON object")
        parsed.append(value)
    return parsed


def read_header(header):
    if not isinstance(header, dict) or header.get("format") != "hearth-ledger":
        raise Malformed('the first line is not a {"format":"hearth-ledger",…} header')
    if not (is_int(header.get("version")) and header["version"] == 1):
        raise Malformed(f"export version {header.get('version')!r}, not 1")
    owner = header.get("owner")
    if peer_key(owner) is None:
        raise Malformed(f"the header's owner {owner!r} is not an Ed25519 peer id")
    return owner


def check_row(row, expected, last, owner):
    """Steps 1 to 4 for one row; raises Bad with the reason."""
    if isinstance(row, DuplicateKey):
        raise Bad(f"the key {row} appears twice in one object, so the row has no single meaning")
    seq = row.get("seq")
    if not (is_int(seq) and seq >= 1):
        raise Bad(f"seq {seq!r} is not an integer ≥ 1")
    # 1. seq continuity
    if seq > expected:
        raise Bad(f"row {expected} is missing (the next row says seq {seq})")
    if seq < expected:
        raise Bad(f"seq {seq} appears again or out of order (expected {expected})")
    missing = sorted(ROW_FIELDS - set(row))
    if missing:
        raise Bad(f"the row has no {', '.join(missing)}")
    extra = sorted(set(row) - ROW_FIELDS)
    if extra:
        raise Bad(f"the row has unexpected {', '.join(extra)}")
    prev, stored = row["prev"], row["hash"]
    for name, value in (("prev", prev), ("hash", stored)):
        if not isinstance(value, str) or not HEX64.fullmatch(value):
            raise Bad(f"{name} is not 64 lowercase hex digits")
    # 2. the link to the row before
    if prev != last:
        raise Bad(f"prev {prev} is not the hash of row {seq - 1} ({last})")
    # 3. a known kind, and the row's own hash
    kind, at, body = row["kind"], row["at"], row["body"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise Bad(f"unknown kind {kind!r}")
    if not is_int(at):
        raise Bad(f"at {at!r} is not an integer")
    if not isinstance(body, dict):
        raise Bad("body is not a JSON object")
    entry = {"at": at, "body": body, "kind": kind, "seq": seq}
    computed = hashlib.sha256(bytes.fromhex(prev) + jcs(entry)).hexdigest()
    if computed != stored:
        raise Bad(f"hash {stored} is not SHA-256(prev ‖ JCS(entry)) = {computed}")
    # 4. signatures, and the owner as a party
    check_kind(kind, body, owner)
    return stored


def verify_chain(rows, owner):
    """The hashes of the rows that pass, and the first bad row as (seq, reason) or None."""
    hashes, expected, last = [], 1, ZEROS
    for row in rows:
        try:
            last = check_row(row, expected, last, owner)
        except Bad as bad:
            return hashes, (expected, str(bad))
        hashes.append(last)
        expected += 1
    return hashes, None


# --- Checkpoints ---------------------------------------------------------------------------------


def read_checkpoint(path):
    try:
        with open(path, "rb") as f:
            value = parse(f.read().decode("utf-8"))
    except OSError as e:
        raise Malformed(f"cannot read checkpoint {path}: {e.strerror}") from None
    except (ValueError, RecursionError, DuplicateKey):
        raise Malformed(f"checkpoint {path} is not JSON") from None
    try:
        has_keys(value, ("body", "signature"), "it")
        body = value["body"]
        has_keys(body, ("version", "peer", "seq", "head", "at"), "its body")
        version_1(body, "its body")
        if not isinstance(body["peer"], str):
            raise Bad("its peer is not a string")
        if not (is_int(body["seq"]) and body["seq"] >= 1):
            raise Bad("its seq is not an integer ≥ 1")
        if not isinstance(body["head"], str) or not HEX64.fullmatch(body["head"]):
            raise Bad("its head is not 64 lowercase hex digits")
        if not is_int(body["at"]):
            raise Bad("its at is not an integer")
        hex_signature(value["signature"], "its signature")
    except Bad as bad:
        raise Malformed(f"checkpoint {path} is not a checkpoint: {bad}") from None
    return body, value["signature"]


def check_checkpoints(paths, owner, hashes, first_bad):
    """The earliest row a checkpoint of the owner shows bad, as (seq, reason), or None."""
    found = None
    for path in paths:
        body, signature = read_checkpoint(path)
        try:
            signed = body["peer"] == owner and signature_holds(TAG_CHECKPOINT, body, signature, owner)
        except Bad:
            signed = False
        if not signed:
            print(f"note: checkpoint {path} is not signed by the owner {owner}; it proves nothing",
                  file=sys.stderr)
            continue
        seq, head = body["seq"], body["head"]
        if first_bad is not None and seq >= first_bad[0]:
            continue  # the chain is already bad at or before the row it pins
        if seq > len(hashes):
            bad = (len(hashes) + 1, f"truncated: the owner's checkpoint {path} pins row {seq}, "
                                    f"but the ledger ends at row {len(hashes)}")
        elif hashes[seq - 1] != head:
            bad = (seq, f"rewritten: the owner's checkpoint {path} says row {seq} has hash {head}, "
                        f"the ledger has {hashes[seq - 1]}")
        else:
            continue
        if found is None or bad[0] < found[0]:
            found = bad
    return found


# --- Main ----------------------------------------------------------------------------------------


def arguments(argv):
    export, checkpoints = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--checkpoint" and i + 1 < len(argv):
            checkpoints.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--checkpoint="):
            checkpoints.append(arg.split("=", 1)[1])
        elif export is None and not arg.startswith("--"):
            export = arg
        else:
            raise Malformed(f"usage: {sys.argv[0]} EXPORT.jsonl [--checkpoint CHECKPOINT.json]...")
        i += 1
    if export is None:
        raise Malformed(f"usage: {sys.argv[0]} EXPORT.jsonl [--checkpoint CHECKPOINT.json]...")
    return export, checkpoints


def run(argv):
    export, checkpoint_paths = arguments(argv)
    lines = read_lines(export)
    owner = read_header(lines[0])
    rows = lines[1:]
    hashes, first_bad = verify_chain(rows, owner)
    witnessed = check_checkpoints(checkpoint_paths, owner, hashes, first_bad)
    if witnessed is not None and (first_bad is None or witnessed[0] < first_bad[0]):
        first_bad = witnessed
    if first_bad is not None:
        return 1, f"broken at row {first_bad[0]}: {first_bad[1]}"
    receipts = sum(1 for row in rows if row["kind"] == "receipt")
    return 0, f"ok {len(rows)} {receipts} {hashes[-1] if hashes else '-'}"


def main():
    try:
        code, line = run(sys.argv[1:])
    except Malformed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(line)
    sys.exit(code)


if __name__ == "__main__":
    main()
