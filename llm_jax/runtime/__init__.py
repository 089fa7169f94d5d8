"""The process and its environment: what every other layer may use.

`errors` (the `UserError` family: a mistake the user can fix, printed as one line), `sharding`
(the device mesh `data x fsdp x tensor`, the logical-axis rules: the one place where the models'
logical axis names meet mesh axes, batch placement), `distributed` (`jax.distributed` start-up,
the preemption notice, agreement across processes), `hostmem` (glibc malloc kept for the next
step on a CPU host) and `files` (atomic writes, file locks, text and gzip opening).

Layer 0: imports nothing else of llm_jax.
"""
