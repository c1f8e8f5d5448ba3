"""Generated protobuf and gRPC stubs for agentrun.v1 (by clients/python/generate.sh).

Do not edit: regenerate instead. The SDK in `agentrun` wraps them; import them directly
only for what the SDK does not cover (e.g. `agentrun.v1.session_service_pb2`).
"""
