"""Registering `fmaas.GenerationService` so that request bytes are parsed inside the handlers.

grpcio runs a method's request deserializer before the handler, and a message that fails to parse (corrupt wire
format, a string field that is not UTF-8) then ends as UNKNOWN with protobuf's exception class in the details.
Every method is registered here with identity deserializers instead, and one wrapper parses the bytes and answers
what cannot be parsed with INVALID_ARGUMENT and a plain message before the servicer sees anything. (TGIS' tonic
router answers such bytes with INTERNAL; the status here is the one a client can act on: docs/ARCHITECTURE.md.)
"""

from __future__ import annotations

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from proto import generation_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


def malformed_message(type_name: str, error: DecodeError) -> str:
    """What the client is told: which message, and whether the bytes or a string inside them were bad."""
    bad_text = "UTF-8" in str(error)
    problem = "a string field is not valid UTF-8" if bad_text else "the bytes are not a valid protobuf message"
    return f"malformed {type_name}: {problem}"


def _parser(message_class):
    async def parse(raw: bytes, context):
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            message = malformed_message(message_class.DESCRIPTOR.full_name, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    return parse


def _handler(method, behavior) -> grpc.RpcMethodHandler:
    parse = _parser(message_factory.GetMessageClass(method.input_type))
    serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
    if method.server_streaming:
        async def streaming(raw: bytes, context):
            async for response in behavior(await parse(raw, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)

    async def unary(raw: bytes, context):
        return await behavior(await parse(raw, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)


def add_generation_service(servicer, server: grpc.aio.Server) -> None:
    """The servicer's four RPCs, bytes parsed by one mechanism (what the generated `add_..._to_server` does,
    except for the deserializers)."""
    handlers = {m.name: _handler(m, getattr(servicer, m.name)) for m in SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
