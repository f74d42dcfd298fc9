"""Generated from the .proto files beside this module by scripts/gen_protos.sh: do not edit."""
