"""Fuzzed inputs from outside the process: the gRPC wire format (distributed/wire.py decode_message: any bytes a
certified peer sends), the YAML config (config.py load_config / validate) and the gRPC ip config
(distributed/ipconfig.py read_ipconfig).

Property, for each: the only exception that comes out is the module's own (WireError, ConfigError), and nothing is
allocated beyond a stated bound per input: the peak of Python's and numpy's allocations (tracemalloc) during the
call, and for the wire the bytes of the decoded tensors (torch allocates them outside tracemalloc's view).

Property-based with hypothesis, derandomized (the same examples on every run, so the suite stays deterministic)
and without an example database; each test is bounded to a few seconds by max_examples.
FEDDPD_FUZZ_EXAMPLES=5000 runs a longer session by hand.
"""
import functools
import json
import math
import os
import struct
import tracemalloc
from collections import OrderedDict

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT

FUZZ = settings(max_examples=int(os.environ.get("FEDDPD_FUZZ_EXAMPLES", 150)), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
MB = 1 << 20


def peak_bytes(call):
    """(what `call()` returned or raised, the peak of traced allocations during it)."""
    tracemalloc.start()
    try:
        try:
            out = call()
        except Exception as exc:  # noqa: BLE001 (returned for the property to judge)
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def mutated(data: bytes, edits) -> bytes:
    """`data` after (position, kind, byte) edits: flip a byte's bits, insert, delete, or cut the rest."""
    out = bytearray(data)
    for pos, kind, byte in edits:
        pos = pos % (len(out) + 1)
        if kind == "flip" and pos < len(out):
            out[pos] ^= byte or 1
        elif kind == "insert":
            out[pos:pos] = bytes([byte])
        elif kind == "delete":
            del out[pos:pos + 1 + byte % 4]
        elif kind == "cut":
            del out[pos:]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 16), st.sampled_from(["flip", "insert", "delete", "cut"]),
                           st.integers(0, 255)), min_size=1, max_size=6)


# --- the wire -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _valid_frames():
    from fedml.core.distributed.communication.message import Message

    from fedml_feddpd.distributed.wire import encode_message
    from fedml_feddpd.supplement import Supplement

    upload = Message("upload", 1, 0)
    upload.add_params("model_params", OrderedDict(w=torch.randn(2, 3), b=torch.zeros(3), n=torch.tensor(4)))
    upload.add_params("num_samples", 40)
    upload.add_params("feddpd_trained_on", {"client": 0, "seconds": 0.25, "supplement": None})
    payload = Message("sync", 0, 1)
    payload.add_params("model_params", {0: {"client": 0, "model": OrderedDict(w=torch.ones(2)),
                                            "supplement": Supplement(torch.rand(2, 1, 2, 2), torch.tensor([1, 3]),
                                                                     {"size": 2})}})
    payload.add_params("extras", (1, -0.0, float("nan"), None, [True, "x"]))
    status = Message("status", 2, 0)
    status.add_params("client_status", "ONLINE")
    return [encode_message(m) for m in (upload, payload, status)]


TAGS = st.sampled_from(["$f", "$tuple", "$dict", "$odict", "$tensor", "$ndarray", "$np", "$supplement", "x"])
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                      st.sampled_from(["nan", "inf", "0", "1", "<f4", "<i8", "|b1", "V8", "O", "(9999999,)f8", "U9"]))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TAGS, inner, min_size=1, max_size=1),
    st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=24)


def _blob(tensors):
    from safetensors.torch import save

    return save({str(i): t.clone() for i, t in enumerate(tensors)}) if tensors else b""


TENSORS = st.lists(st.sampled_from([torch.zeros(3), torch.ones(2, 2, dtype=torch.int64), torch.tensor(True),
                                    torch.empty(0, 4), torch.rand(1, 1, 2, 2).half()]), max_size=3)


def _frame(header, blob: bytes, version: int = 1) -> bytes:
    text = json.dumps(header).encode()
    return b"FDPD" + bytes([version]) + struct.pack(">I", len(text)) + text + blob


FRAMES = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda n, body: b"FDPD\x01" + struct.pack(">I", n) + body, st.integers(0, 2**32 - 1),
              st.binary(max_size=512)),
    st.builds(lambda i, edits: mutated(_valid_frames()[i], edits), st.integers(0, 2), EDITS),
    st.builds(lambda t, s, r, p, tensors, junk: _frame({"type": t, "sender": s, "receiver": r, "params": p},
                                                       _blob(tensors) + junk),
              st.one_of(st.text(max_size=6), JSON), JSON, st.integers(-1, 3), JSON, TENSORS,
              st.sampled_from([b"", b"\x00", b"{}"])),
    st.builds(lambda h, tensors: _frame(h, _blob(tensors)), JSON, TENSORS),
)


@FUZZ
@given(FRAMES)
def test_decode_message_raises_only_wire_errors_within_bounds(data):
    from fedml.core.distributed.communication.message import Message

    from fedml_feddpd.distributed.wire import WireError, decode_message

    out, peak = peak_bytes(lambda: decode_message(data))
    assert isinstance(out, (Message, WireError)), f"{type(out).__name__}: {out}"
    # Python and numpy allocations: the JSON header and the decoded values, a small multiple of the frame
    assert peak <= 2 * MB + 16 * len(data), (peak, len(data))
    if isinstance(out, Message):  # the tensors come from the frame's own bytes, never more
        tensors = []

        def walk(v):
            if isinstance(v, torch.Tensor):
                tensors.append(v)
            elif isinstance(v, dict):
                [walk(x) for kv in v.items() for x in kv]
            elif isinstance(v, (list, tuple)):
                [walk(x) for x in v]
            elif hasattr(v, "images"):
                walk([v.images, v.labels, v.stats])

        walk(out.msg_params)
        assert sum(t.element_size() * t.numel() for t in tensors) <= len(data)


def test_the_valid_frames_decode():
    from fedml_feddpd.distributed.wire import decode_message

    assert [decode_message(f).type for f in _valid_frames()] == ["upload", "sync", "status"]


# --- the YAML config ---------------------------------------------------------------------------------------------
BASE = open(os.path.join(ROOT, "configs", "digits_fedavg.yaml")).read()
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**66, 2**66), st.floats(), st.text(max_size=16),
              st.sampled_from(["digits", "mnist", "fashion_mnist", "GRPC", "MPI", "cross_silo", "FedDPD", "auto",
                               "cnn", "natural", "2001-13-45", "0x" + "f" * 5000, "1" * 5000, ""])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=12)
SECTIONS = ["common_args", "data_args", "model_args", "train_args", "comm_args", "run_args", "feddpd", "generator",
            "dpo_args", "device_args", "tracking_args", "bogus"]


def _schema_keys():
    from dataclasses import fields

    from fedml_feddpd.config import DATACLASS_SECTIONS, _dataclass_for, schema

    keys = {s: list(k) for s, k in schema().items()}
    keys.update({s: [f.name for f in fields(_dataclass_for(s))] for s in DATACLASS_SECTIONS})
    return keys


KEYS = _schema_keys()
EDIT = st.tuples(st.sampled_from(SECTIONS), st.integers(0, 40), VALUES, st.sampled_from(["set", "delete", "section"]))


def _edited(edits) -> dict:
    raw = yaml.safe_load(BASE)
    for section, index, value, kind in edits:
        if kind == "section":
            raw[section] = value
            continue
        body = raw.setdefault(section, {}) if isinstance(raw.get(section, {}), dict) else {}
        keys = KEYS.get(section) or ["nope"]
        key = keys[index % len(keys)]
        if kind == "delete":
            body.pop(key, None)
        else:
            body[key] = value
    return raw


def _bomb(levels: int, where: int) -> str:
    """A config with an alias bomb of `levels` levels (9**levels values) as the value of one key."""
    value = "[&a0 [x,x,x,x,x,x,x,x,x]" + "".join(
        f", &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)) + "]"
    key = ["comm_round: ", "dataset: ", "tls: ", "output_dir: "][where % 4]
    text = BASE if key != "tls: " else BASE.replace("comm_args:\n", "comm_args:\n  tls: 1\n")
    return text.replace(key, f"{key}{value} #", 1)


YAML_TEXTS = st.one_of(
    st.builds(lambda edits: yaml.safe_dump(_edited(edits)).encode(), st.lists(EDIT, min_size=1, max_size=4)),
    st.builds(lambda edits: mutated(BASE.encode(), edits), EDITS),
    st.builds(lambda levels, where: _bomb(levels, where).encode(), st.integers(1, 12), st.integers(0, 3)),
    st.binary(max_size=256),
    st.text(alphabet="{}[]&*!:-,|>'\"\n #?%@`abc01", max_size=200).map(str.encode),
)


@pytest.fixture(scope="module")
def yaml_file(tmp_path_factory):
    from fedml_feddpd.config import load_config

    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(BASE)
    load_config(path)  # imports done before anything is measured
    return path


@FUZZ
@given(YAML_TEXTS)
def test_load_config_raises_only_config_errors_within_bounds(yaml_file, data):
    from fedml_feddpd.config import ConfigError, RunConfig, load_config

    yaml_file.write_bytes(data)
    out, peak = peak_bytes(lambda: load_config(yaml_file))
    assert isinstance(out, (RunConfig, ConfigError)), f"{type(out).__name__}: {out}"
    assert isinstance(out, RunConfig) or "\n" not in str(out)
    assert peak <= 8 * MB, peak  # a few KB of YAML: PyYAML's nodes and events, and the resolved config


@FUZZ
@given(st.lists(EDIT, min_size=1, max_size=4))
def test_validate_raises_only_config_errors(edits):
    from fedml_feddpd.config import ConfigError, RunConfig, validate

    out, peak = peak_bytes(lambda: validate(_edited(edits), "fuzz.yaml"))
    assert isinstance(out, (RunConfig, ConfigError)), f"{type(out).__name__}: {out}"
    assert peak <= 4 * MB, peak


def test_an_alias_bomb_is_refused_in_one_short_line(yaml_file):
    from fedml_feddpd.config import ConfigError, load_config

    yaml_file.write_text(_bomb(12, 0))  # 9**12 values in ~700 bytes
    out, peak = peak_bytes(lambda: load_config(yaml_file))
    assert isinstance(out, ConfigError) and "expected a config of at most 10000 values" in str(out)
    assert peak <= 8 * MB and len(str(out)) < 300


# --- the ip config -----------------------------------------------------------------------------------------------
FIELD = st.one_of(st.integers(-2, 70000).map(str), st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "0.0.0.0",
                                                                    "localhost", "", " 1", "1e3", "9" * 5000]),
                  st.text(max_size=8))
ROW = st.lists(FIELD, min_size=0, max_size=6).map(",".join)
IPCONFIG = st.one_of(
    st.builds(lambda header, rows, crlf: ((header + "\n" + "\n".join(rows)).replace("\n", "\r\n" if crlf else "\n"))
              .encode(), st.sampled_from(["eid,rank,grpc_server_ip,grpc_server_port", "rank,eid,grpc_server_port,"
                                          "grpc_server_ip", "eid,rank", ""]), st.lists(ROW, max_size=5), st.booleans()),
    st.builds(lambda rows, edits: mutated(("eid,rank,grpc_server_ip,grpc_server_port\n" + "\n".join(
        f"{r},{r},127.0.0.1,{9000 + r}" for r in range(rows))).encode(), edits), st.integers(0, 4), EDITS),
    st.binary(max_size=256),
)


@FUZZ
@given(IPCONFIG, st.integers(1, 4))
def test_read_ipconfig_raises_only_config_errors_within_bounds(tmp_path_factory, data, parties):
    from fedml_feddpd.distributed.ipconfig import read_ipconfig
    from fedml_feddpd.errors import ConfigError

    path = tmp_path_factory.getbasetemp() / "fuzz_ipconfig.csv"
    path.write_bytes(data)
    out, peak = peak_bytes(lambda: read_ipconfig(path, parties))
    assert isinstance(out, (dict, ConfigError)), f"{type(out).__name__}: {out}"
    assert isinstance(out, dict) or "\n" not in str(out)
    assert peak <= 1 * MB + 64 * len(data), (peak, len(data))
    if isinstance(out, dict):
        assert sorted(out) == list(range(parties)) and all(1 <= port <= 65535 for _, port in out.values())


def test_mutation_helper():
    assert mutated(b"abcd", [(1, "flip", 1)]) == b"acd"[:1] + bytes([ord("b") ^ 1]) + b"cd"
    assert mutated(b"abcd", [(2, "cut", 0)]) == b"ab" and mutated(b"ab", [(0, "insert", 65)]) == b"Aab"
    assert math.isfinite(float(len(_bomb(3, 1))))
