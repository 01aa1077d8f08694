"""Real processes on free ports, for whatever drives the system from outside.

`ServiceProcess` is a real `python -m service`; `RedisProcess` is a private
redis-server that can be killed and started again. The benchmark (`python -m bench`,
`python -m bench.soak`) and the integration tests start theirs with these classes. The
harness knows nothing of pytest: a process that cannot start raises RuntimeError with
the reason, and the caller decides what that means.
"""
