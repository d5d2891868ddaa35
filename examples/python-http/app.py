"""A Python HTTP handler for beamlet: a plain wasi:http/proxy component built
with componentize-py. Routes: /hello, /echo (returns the request body), and
404 for anything else. `x-served` counts the requests this instance has
served, which shows beamlet's warm instance reuse (1, 2, 3, ... per worker).
"""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

served = 0
CHUNK = 4096


def read_body(request: IncomingRequest) -> bytes:
    body = request.consume()
    stream = body.stream()
    data = bytearray()
    while True:
        try:
            data += stream.blocking_read(65536)
        except Err:
            break  # closed: the whole body is in
    stream.__exit__(None, None, None)
    return bytes(data)


def respond(response_out: ResponseOutparam, status: int, body: bytes) -> None:
    headers = Fields.from_list(
        [("content-type", b"text/plain"), ("x-served", str(served).encode())]
    )
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = outgoing.write()
    for start in range(0, len(body), CHUNK):
        stream.blocking_write_and_flush(body[start : start + CHUNK])
    stream.__exit__(None, None, None)
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global served
        served += 1
        path = (request.path_with_query() or "/").split("?")[0]
        if path == "/hello":
            respond(response_out, 200, b"Hello from Python!\n")
        elif path == "/echo":
            respond(response_out, 200, read_body(request))
        else:
            respond(response_out, 404, b"not found: this app serves /hello and /echo\n")
