"""The gRPC wire format: FedML `Message`s without pickle, so that nothing executable crosses the network.

FedML's gRPC transport pickles every message (core/distributed/communication/grpc/grpc_comm_manager.py:115)
and unpickles whatever arrives (:167): anyone who can reach a party's port can run code in it. Here a
message is a frame of plain data:

    b"FDPD" | version (1 byte) | header length (4 bytes, big-endian) | header (UTF-8 JSON) | safetensors blob

The header is {"type", "sender", "receiver", "params"}: the Message's fields, with every value encoded as
JSON. JSON's own null, booleans, integers, finite floats, strings and lists stand for themselves; every
JSON object is a tag with exactly one key:

    {"$f": "nan" | "inf" | "-inf"}           a float JSON cannot hold
    {"$tuple": [v, ...]}                      a tuple
    {"$dict": [[k, v], ...]}                  a dict (keys of any encodable type, order kept)
    {"$odict": [[k, v], ...]}                 a collections.OrderedDict (model state dicts)
    {"$tensor": "<name>"}                     a torch tensor: entry <name> of the safetensors blob
    {"$ndarray": "<name>"}                    a numpy array, the same way
    {"$np": ["<dtype>", v]}                   a numpy scalar (np.int64, np.float32, ...)
    {"$supplement": [images, labels, stats]}  a fedml_feddpd.supplement.Supplement

Tensors keep their dtype, shape and bytes (safetensors), so floats cross bit for bit. Anything else is
refused when sending (WireError naming the type), and a frame that does not parse exactly is refused when
receiving: decoding builds only the types above and imports nothing.
"""
from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from typing import Any

MAGIC, VERSION = b"FDPD", 1
_PREFIX = struct.Struct(">4sBI")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class WireError(ValueError):
    """A value that cannot be encoded, or bytes that are not a message in this format."""


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, Any] = {}
        self._storages: set[int] = set()

    def _blob_ref(self, tensor) -> str:
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in self._storages:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        self._storages.add(tensor.untyped_storage().data_ptr())
        name = str(len(self.tensors))
        self.tensors[name] = tensor
        return name

    def value(self, v):
        import numpy as np
        import torch

        t = type(v)
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            return v if math.isfinite(v) else {"$f": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        if t is list:
            return [self.value(x) for x in v]
        if t is tuple:
            return {"$tuple": [self.value(x) for x in v]}
        if t is dict or t is OrderedDict:
            return {"$dict" if t is dict else "$odict": [[self.value(k), self.value(x)] for k, x in v.items()]}
        if t is torch.Tensor:
            return {"$tensor": self._blob_ref(v)}
        if t is np.ndarray:
            if v.dtype.hasobject:
                raise WireError("cannot send a numpy array of Python objects")
            return {"$ndarray": self._blob_ref(torch.from_numpy(np.ascontiguousarray(v)))}
        if isinstance(v, np.generic) and (v.dtype.kind in "biuf"):
            return {"$np": [v.dtype.str, self.value(v.item())]}
        from ..supplement import Supplement

        if t is Supplement:
            return {"$supplement": [self.value(v.images), self.value(v.labels), self.value(v.stats)]}
        raise WireError(f"cannot send a value of type {t.__module__}.{t.__qualname__}")

    def frame(self, header: dict) -> bytes:
        from safetensors.torch import save

        text = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
        try:
            blob = save(self.tensors)
        except Exception as exc:  # a dtype safetensors does not store
            raise WireError(f"cannot send these tensors: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        return _PREFIX.pack(MAGIC, VERSION, len(text)) + text + blob


class _Decoder:
    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.used: set[str] = set()

    def _tensor(self, name):
        if type(name) is not str or name not in self.tensors or name in self.used:
            raise WireError(f"bad tensor reference {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def value(self, v):
        t = type(v)
        if v is None or t in (bool, int, float, str):
            return v
        if t is list:
            return [self.value(x) for x in v]
        if t is not dict or len(v) != 1:
            raise WireError("a JSON object in a message must be one tag")
        (tag, body), = v.items()
        if tag == "$f" and body in _NONFINITE:
            return _NONFINITE[body]
        if tag == "$tuple" and type(body) is list:
            return tuple(self.value(x) for x in body)
        if tag in ("$dict", "$odict") and type(body) is list:
            pairs = []
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError(f"{tag} entries must be [key, value] pairs")
                pairs.append((self.value(pair[0]), self.value(pair[1])))
            return dict(pairs) if tag == "$dict" else OrderedDict(pairs)
        if tag == "$tensor":
            return self._tensor(body)
        if tag == "$ndarray":
            return self._tensor(body).numpy()
        if tag == "$np" and type(body) is list and len(body) == 2 and type(body[0]) is str:
            import numpy as np

            dtype = np.dtype(body[0])
            if dtype.kind not in "biuf":
                raise WireError(f"bad numpy scalar type {body[0]!r}")
            return dtype.type(self.value(body[1]))
        if tag == "$supplement" and type(body) is list and len(body) == 3:
            import torch

            from ..supplement import Supplement

            images, labels, stats = (self.value(x) for x in body)
            if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and type(stats) is dict):
                raise WireError("a supplement is [images tensor, labels tensor, stats dict]")
            return Supplement(images, labels, stats)
        raise WireError(f"unknown or malformed tag {tag!r}")


def _unframe(data: bytes) -> tuple[dict, dict]:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < _PREFIX.size:
        raise WireError("too short to be a message")
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a FedDPD message (starts with {bytes(data[:4])!r})")
    if version != VERSION:
        raise WireError(f"wire format version {version}, expected {VERSION}")
    end = _PREFIX.size + length
    if end > len(data):
        raise WireError("header longer than the message")
    try:
        header = json.loads(bytes(data[_PREFIX.size:end]).decode("utf-8"),
                            parse_constant=lambda c: (_ for _ in ()).throw(WireError(f"bare {c} in header")))
        from safetensors.torch import load

        # safetensors' tensors view the received bytes: copy, so that nothing writes into them.
        tensors = {k: t.clone() for k, t in load(bytes(data[end:])).items()}
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"unreadable message: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if type(header) is not dict:
        raise WireError("the header is not a JSON object")
    return header, tensors


def _decode(data: bytes, keys: tuple) -> tuple[dict, Any]:
    header, tensors = _unframe(data)
    if set(header) != set(keys):
        raise WireError(f"header keys {sorted(header)}, expected {sorted(keys)}")
    decoder = _Decoder(tensors)
    try:
        out = {k: decoder.value(header[k]) for k in keys}
    except WireError:
        raise
    except RecursionError:
        raise WireError("nested too deeply") from None
    except Exception as exc:  # e.g. a numpy scalar whose value does not fit its dtype
        raise WireError(f"bad value: {type(exc).__name__}") from None
    if decoder.used != set(tensors):
        raise WireError("tensors in the message that the header does not reference")
    return out


def encode_value(value) -> bytes:
    """One value in a frame of its own (what `encoded_size` counts)."""
    enc = _Encoder()
    return enc.frame({"value": enc.value(value)})


def decode_value(data: bytes):
    return _decode(data, ("value",))["value"]


def encoded_size(value) -> int:
    """Bytes of `value` as this transport carries it."""
    return len(encode_value(value))


def encode_message(msg) -> bytes:
    """A FedML Message (core/distributed/communication/message.py) as a frame."""
    enc = _Encoder()
    return enc.frame({"type": msg.type, "sender": enc.value(msg.sender_id), "receiver": enc.value(msg.receiver_id),
                      "params": enc.value(msg.msg_params)})


def decode_message(data: bytes):
    """The FedML Message a frame holds; WireError when `data` is anything else."""
    from fedml.core.distributed.communication.message import Message

    fields = _decode(data, ("type", "sender", "receiver", "params"))
    if type(fields["type"]) is not str or type(fields["params"]) is not dict:
        raise WireError("type must be a string and params a dict")
    for key in ("sender", "receiver"):
        if type(fields[key]) is not int:
            raise WireError(f"{key} must be an integer rank, got {type(fields[key]).__name__}")
    msg = Message(fields["type"], fields["sender"], fields["receiver"])
    msg.msg_params = fields["params"]
    return msg
