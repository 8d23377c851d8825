"""Parallel layout (dims), process groups (env), the ZeRO engine adapter (engine) and the layout planner (plan)."""
