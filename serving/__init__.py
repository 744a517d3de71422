"""How every service handles a request: ``decode_request → run → encode_response`` behind one thin adapter.

Neutral: imports no service. :mod:`serving.grpc_service` adapts a :class:`~serving.contract.StreamingApi` to a
gRPC server-streaming method and runs the server (:func:`~serving.grpc_service.run_grpc_service`).
"""
