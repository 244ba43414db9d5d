"""The core that decides: admission, the pending pool, step plans, answers, the run loop.

Synchronous and typed except for the short loop in ``engine``; knows nothing of
gRPC, protobuf or the APIs (a test walks the imports).
"""
