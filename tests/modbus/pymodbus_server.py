#!/usr/bin/env python3
"""A Modbus TCP server from pymodbus (not written by this project) for the cross-implementation
test in tests/api/modbus_pymodbus.rs.

The test passes a register map of typed values; this script encodes each value itself, with
Python's struct module and the byte order's definition, so the gateway's decoder is checked
against an encoder it does not share. It serves on 127.0.0.1:PORT, prints one line per request
PDU it receives ("REQ <function> <address> <count>"), and exits after --lifetime seconds or when
its stdin closes, whichever comes first. With --port 0 (the default) it binds a free port and
prints "LISTENING <port>" once bound.

    pymodbus_server.py --map '[{"table": "input", "address": 0, "type": "int16",
                                            "order": "ABCD", "value": -153}, ...]'
"""

import argparse
import asyncio
import json
import struct
import sys

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusTcpServer

FORMATS = {
    "int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
    "int64": ">q", "uint64": ">Q", "float64": ">d",
}
FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


def registers(data_type, order, value):
    """The registers holding `value`: big-endian bytes A B C D..., then reordered."""
    raw = struct.pack(FORMATS[data_type], value)
    words = [raw[i:i + 2] for i in range(0, len(raw), 2)]
    if order in ("DCBA", "CDAB"):  # least significant register first
        words.reverse()
    if order in ("DCBA", "BADC"):  # bytes swapped within each register
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def trace(sending, pdu):
    if not sending:
        count = getattr(pdu, "count", None)
        print(f"REQ {pdu.function_code} {getattr(pdu, 'address', '-')} {count}", flush=True)
    return pdu


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--map", required=True)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()

    blocks = {name: ModbusSequentialDataBlock(0, [0] * 1000) for name in ("di", "co", "hr", "ir")}
    device = ModbusDeviceContext(**blocks)
    for entry in json.loads(args.map):
        function = FUNCTION[entry["table"]]
        if entry["type"] == "bool":
            values = [bool(entry["value"])]
        else:
            values = registers(entry["type"], entry.get("order", "ABCD"), entry["value"])
        # The context maps protocol address a to its own a + 1 on both sides.
        device.setValues(function, entry["address"], values)
    context = ModbusServerContext(devices=device, single=True)
    server = ModbusTcpServer(context, address=("127.0.0.1", args.port), trace_pdu=trace)

    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    # Returns once bound (port 0: the kernel picks a free one, so tests never race for it).
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    await asyncio.wait([stdin_closed], timeout=args.lifetime)
    await server.shutdown()
    # The executor thread reading stdin cannot be interrupted: leave without waiting for it.
    sys.stdout.flush()
    import os
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
