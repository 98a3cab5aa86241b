"""Generated OIP v2 gRPC stubs (``make grpc-stubs``) and their .proto."""
