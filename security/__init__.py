"""Transport security shared by the services: testbed certificates and gRPC TLS credentials."""
