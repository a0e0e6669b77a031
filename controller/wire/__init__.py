"""The only code that touches protobuf: the agent client and proto <-> model conversion.

Why one boundary: the agent converts kernel/daemon data to protobuf, this layer converts
protobuf to the frozen model (and requests back), so analysis, trace and report never see a
generated class and a proto change breaks exactly one place.
"""
