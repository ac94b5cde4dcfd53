"""The task queue: every state change of a task, claims, leases, the scheduler, wake-ups, runners."""
