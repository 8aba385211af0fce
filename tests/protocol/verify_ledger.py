#!/usr/bin/env python3
"""Verify an exported Hearth ledger, written from docs/ledger.md (and docs/protocol.md) alone.

Usage: verify_ledger.py EXPORT.jsonl [--strict] [--checkpoint CHECKPOINT.json]...

EXPORT is the JSON Lines export (`hearth ledger export --format jsonl`); each CHECKPOINT holds one
signed checkpoint `{"body": {...}, "signature": "..."}` that a witness kept. The checkpoints an
export carries (`--with-witnesses`) count as if they were given so.

Prints `ok ROWS RECEIPTS HEAD ANCHOR` (HEAD: the last row's hash, `-` for an empty ledger;
ANCHOR: `signed` when the export ends with its owner's signed head of its last row, else
`unsigned`) and exits 0 when every row passes the steps of "Verification", no agreement has two
receipts, no checkpoint signed by the owner contradicts the chain and the signed head (if any)
holds; prints `broken at row N: REASON` for the first bad row and exits 1; with `--strict`, prints
`unsigned: REASON` and exits 1 for an export without a signed head; prints `error: ...` on stderr
and exits 2 when the input is not an export (or a checkpoint file is not a checkpoint). A
checkpoint that is not the owner's proves nothing: it is reported on stderr as a note and
otherwise ignored, as is a held checkpoint (of another agent's ledger) that does not verify.

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
    if set(header) != {"format", "version", "owner"}:
        raise Malformed("the header has fields other than format, version and owner")
    if not (is_int(header.get("version")) and header["version"] in (1, 2)):
        raise Malformed(f"export version {header.get('version')!r}, not 1 or 2")
    owner = header.get("owner")
    if peer_key(owner) is None:
        raise Malformed(f"the header's owner {owner!r} is not an Ed25519 peer id")
    return owner, header["version"]


def split_export(lines, version):
    """The export's parts: (witness lines, held lines, rows, signed head or None). Checkpoints
    come first, then rows, then at most one signed head, the last line; version 1 has rows alone."""
    witnesses, held, rows, head = [], [], [], None
    part = 0  # 0: checkpoints, 1: rows, 2: the end
    for number, line in enumerate(lines, start=2):
        if isinstance(line, DuplicateKey) or "seq" in line:
            kind, at = "row", 1
        elif set(line) == {"witness", "checkpoint"}:
            kind, at = "witness", 0
        elif set(line) == {"held"}:
            kind, at = "held", 0
        elif set(line) == {"signed_head"}:
            kind, at = "head", 2
        else:
            raise Malformed(f"line {number} is neither a row, a checkpoint nor the signed head")
        if at < part or part == 2:
            raise Malformed(f"line {number} is out of place (checkpoints, rows, then the signed head)")
        if version == 1 and kind != "row":
            raise Malformed(f"line {number}: a version 1 export holds rows alone")
        part = at
        if kind == "row":
            rows.append(line)
        elif kind == "witness":
            witnesses.append(line)
        elif kind == "held":
            held.append(line)
        else:
            head = line["signed_head"]
    return witnesses, held, rows, head


def check_row(row, expected, last, owner, receipts):
    """Steps 1 to 5 for one row; raises Bad with the reason. `receipts` maps each agreement with
    a receipt so far to that receipt's row."""
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
    # 5. one receipt per agreement
    if kind == "receipt":
        agreement = body["receipt"].get("agreement_id")
        if not isinstance(agreement, str) or not agreement:
            raise Bad("the receipt names no agreement_id")
        if agreement in receipts:
            raise Bad(f"a second receipt of agreement {agreement} (the first is row {receipts[agreement]})")
        receipts[agreement] = seq
    return stored


def verify_chain(rows, owner):
    """The hashes of the rows that pass, and the first bad row as (seq, reason) or None."""
    hashes, expected, last, receipts = [], 1, ZEROS, {}
    for row in rows:
        try:
            last = check_row(row, expected, last, owner, receipts)
        except Bad as bad:
            return hashes, (expected, str(bad))
        hashes.append(last)
        expected += 1
    return hashes, None


# --- Checkpoints ---------------------------------------------------------------------------------


def read_checkpoint_file(path):
    try:
        with open(path, "rb") as f:
            value = parse(f.read().decode("utf-8"))
    except OSError as e:
        raise Malformed(f"cannot read checkpoint {path}: {e.strerror}") from None
    except (ValueError, RecursionError, DuplicateKey):
        raise Malformed(f"checkpoint {path} is not JSON") from None
    return read_checkpoint(value, path)


def read_checkpoint(value, path, least_seq=1):
    """A signed checkpoint's body and signature; `path` names it in errors."""
    try:
        has_keys(value, ("body", "signature"), "it")
        if set(value) != {"body", "signature"}:
            raise Bad("it has fields other than body and signature")
        body = value["body"]
        has_keys(body, ("version", "peer", "seq", "head", "at"), "its body")
        version_1(body, "its body")
        if not isinstance(body["peer"], str):
            raise Bad("its peer is not a string")
        if not (is_int(body["seq"]) and body["seq"] >= least_seq):
            raise Bad(f"its seq is not an integer ≥ {least_seq}")
        if not isinstance(body["head"], str) or not HEX64.fullmatch(body["head"]):
            raise Bad("its head is not 64 lowercase hex digits")
        if not is_int(body["at"]):
            raise Bad("its at is not an integer")
        hex_signature(value["signature"], "its signature")
    except Bad as bad:
        raise Malformed(f"checkpoint {path} is not a checkpoint: {bad}") from None
    return body, value["signature"]


def check_checkpoints(checkpoints, owner, hashes, first_bad):
    """The earliest row a checkpoint of the owner shows bad, as (seq, reason), or None.
    `checkpoints` are (name, body, signature)."""
    found = None
    for path, body, signature in checkpoints:
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


def check_signed_head(head, owner, hashes, first_bad):
    """The first bad row the export's signed head shows, as (seq, reason), or None."""
    body, signature = head
    last = len(hashes)
    try:
        signed = body["peer"] == owner and signature_holds(TAG_CHECKPOINT, body, signature, owner)
    except Bad:
        signed = False
    if not signed:
        return (last + 1, "the export's signed head is not signed by its owner")
    seq = body["seq"]
    if first_bad is not None:
        return None  # already bad at a row the head covers
    if seq > last:
        return (last + 1, f"missing: the export's signed head is of row {seq}, but its rows end at row {last}")
    if seq < last:
        return (seq + 1, f"row {seq + 1} is past the export's signed head, which is of row {seq}")
    if body["head"] != (hashes[-1] if hashes else ZEROS):
        return (last, f"rewritten: the export's signed head says row {last} has hash {body['head']}")
    return None


def report_held(held):
    """Checkpoints the owner holds of other agents' ledgers: each must be its signer's."""
    for number, line in enumerate(held, start=1):
        body, signature = read_checkpoint(line["held"], f"held #{number}")
        try:
            ok = signature_holds(TAG_CHECKPOINT, body, signature, body["peer"])
        except Bad:
            ok = False
        if not ok:
            print(f"note: held checkpoint #{number} (of {body['peer']}) is not signed by it",
                  file=sys.stderr)


def arguments(argv):
    export, checkpoints, strict = None, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--strict":
            strict = True
            i += 1
            continue
        if arg == "--checkpoint" and i + 1 < len(argv):
            checkpoints.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--checkpoint="):
            checkpoints.append(arg.split("=", 1)[1])
        elif export is None and not arg.startswith("--"):
            export = arg
        else:
            raise Malformed(f"usage: {sys.argv[0]} EXPORT.jsonl [--strict] [--checkpoint CHECKPOINT.json]...")
        i += 1
    if export is None:
        raise Malformed(f"usage: {sys.argv[0]} EXPORT.jsonl [--strict] [--checkpoint CHECKPOINT.json]...")
    return export, checkpoints, strict


def run(argv):
    export, checkpoint_paths, strict = arguments(argv)
    lines = read_lines(export)
    if isinstance(lines[0], DuplicateKey):
        raise Malformed("the header names a key twice")
    owner, version = read_header(lines[0])
    witnesses, held, rows, head = split_export(lines[1:], version)
    checkpoints = [(path, *read_checkpoint_file(path)) for path in checkpoint_paths]
    for line in witnesses:
        if not isinstance(line["witness"], str):
            raise Malformed("a witness line names no witness")
        checkpoints.append((f"the one {line['witness']} holds", *read_checkpoint(line["checkpoint"], "a witness line")))
    report_held(held)
    if head is not None:
        head = read_checkpoint(head, "the signed head", least_seq=0)
    hashes, first_bad = verify_chain(rows, owner)
    for found in (check_checkpoints(checkpoints, owner, hashes, first_bad),
                  head and check_signed_head(head, owner, hashes, first_bad)):
        if found is not None and (first_bad is None or found[0] < first_bad[0]):
            first_bad = found
    if first_bad is not None:
        return 1, f"broken at row {first_bad[0]}: {first_bad[1]}"
    if head is None and strict:
        return 1, "unsigned: the export has no signed head, so its end and its unsigned rows are not vouched for"
    receipts = sum(1 for row in rows if row["kind"] == "receipt")
    anchor = "signed" if head is not None else "unsigned"
    return 0, f"ok {len(rows)} {receipts} {hashes[-1] if hashes else '-'} {anchor}"


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
