"""The delivery core: pure state machines and their bookkeeping (state, core, preemption,
liveness, recovery), and the async runner that performs what the core decides."""
