"""Bytes and seconds per round of the gRPC wire format (fedml_feddpd/distributed/wire.py) against FedML's
pickle, for the digits model.

    python -m benchmarks.serialization [--clients 10] [--supplement 40] [--repeats 20]

One round of configs/digits_feddpd_silo.yaml: the server sends each client its payload {client, model,
supplement} (a supplement round: `--supplement` 8x8 images each) and each client uploads its model with
its sample count and report. Seconds are encode + decode of all of the round's messages on this machine
(median of the repeats, one thread).
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch


def round_messages(clients: int, supplement: int):
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage as M

    from fedml_feddpd.distributed.common import KEY_TRAINED_ON
    from fedml_feddpd.models.cnn_digits import CNNDigits
    from fedml_feddpd.supplement import Supplement

    torch.manual_seed(0)
    state = CNNDigits(10).state_dict()
    out = []
    for c in range(clients):
        sup = Supplement(torch.rand(supplement, 1, 8, 8), torch.randint(0, 10, (supplement,)),
                         {"budget": supplement, "size": supplement, "allocation": [supplement // 10] * 10,
                          "classes": [supplement // 10] * 10, "dpo_pairs": 16, "dpo": {"loss": 0.69}})
        down = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, c + 1)
        down.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, {"client": c, "model": state, "supplement": sup})
        down.add_params(M.MSG_ARG_KEY_CLIENT_INDEX, str(c))
        up = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, c + 1, 0)
        up.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, state)
        up.add_params(M.MSG_ARG_KEY_NUM_SAMPLES, 100)
        up.add_params(KEY_TRAINED_ON, {"client": c, "seconds": 0.5, "supplement": {"size": supplement,
                                                                                   "sha256": "0" * 64}})
        for m in (down, up):
            for k, v in (("sender_rank", m.sender_id), ("sender_ip", "127.0.0.1"), ("sender_port", 8890)):
                m.add_params(k, v)
        out += [down, up]
    return out, sum(t.numel() * t.element_size() for t in state.values())


def measure(messages, encode, decode, repeats: int) -> tuple[int, float]:
    size = sum(len(encode(m)) for m in messages)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m in messages:
            decode(encode(m))
        times.append(time.perf_counter() - start)
    return size, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--supplement", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    a = parser.parse_args()
    torch.set_num_threads(1)
    from fedml_feddpd.distributed.wire import decode_message, encode_message

    messages, model_bytes = round_messages(a.clients, a.supplement)
    print(f"digits model: {model_bytes} bytes of parameters; one round = {len(messages)} messages "
          f"({a.clients} clients, {a.supplement}-image supplements)")
    print(f"{'format':<22}{'bytes/round':>14}{'encode+decode s/round':>24}")
    for name, enc, dec in (("pickle (FedML)", pickle.dumps, pickle.loads),
                           ("JSON+safetensors", encode_message, decode_message)):
        size, seconds = measure(messages, enc, dec, a.repeats)
        print(f"{name:<22}{size:>14,}{seconds:>24.4f}")


if __name__ == "__main__":
    main()
