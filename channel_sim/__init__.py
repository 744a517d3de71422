"""Wireless channel emulator: channel models (library) and the gRPC proxy service."""
