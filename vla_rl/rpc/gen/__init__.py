"""Generated gRPC/protobuf stubs (scripts/gen_protos.sh). Do not edit."""
