"""Stubs of protos/vla_rl/v1 (scripts/gen_protos.sh). Do not edit."""
