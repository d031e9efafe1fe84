"""The wire contract between the server and devices (being assembled: see docs/architecture.md)."""

# FitIns config key carrying the parameter names in the order of the legacy SecAgg+
# Parameters list (legacy Parameters have no names).
PARAM_KEYS = "fedrec-param-keys"
